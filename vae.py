"""The VAE: reparameterisation, the analytic KL, the likelihoods, the ELBO, and the conv networks.

Read beside [Luo] (ELBO, VAE) and [DiffuseVAE] (the generator half of DiffuseVAE: one stochastic layer,
x_hat_0 = dec(z) is what the DDPM refines). The key identity ([Luo], derivations README):

    log p(x) = ELBO + KL(q(z|x) || p(z|x)) >= ELBO,
    ELBO     = E_{q(z|x)}[log p(x|z)] - KL(q(z|x) || N(0, I)).

Images are in [-1, 1] (data.py converts). The decoder is Gaussian with one learned scalar variance
(the "sigma-VAE" choice): the ELBO is then a true bound on the continuous density and needs no hand-set
weight between the two terms.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------- the math

def reparameterize(mu, logvar, eps=None):
    """z = mu + sigma * eps, eps ~ N(0, I): a differentiable draw from q(z|x) = N(mu, sigma^2) ([Luo], VAE)."""
    eps = torch.randn_like(mu) if eps is None else eps
    return mu + torch.exp(0.5 * logvar) * eps


def kl_standard_normal(mu, logvar):
    """KL(N(mu, diag sigma^2) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2), per example (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def gaussian_log_likelihood(x, mean, logvar):
    """log N(x; mean, e^logvar I), summed over dimensions, per example (B,). logvar broadcasts."""
    logvar = torch.as_tensor(logvar, dtype=x.dtype, device=x.device).expand_as(x)
    return (-0.5 * (LOG_2PI + logvar + (x - mean).pow(2) * torch.exp(-logvar))).flatten(1).sum(1)


def bernoulli_log_likelihood(x01, logits):
    """log Bernoulli(x; sigmoid(logits)) for x in [0, 1], summed over dimensions, per example (B,)."""
    return -F.binary_cross_entropy_with_logits(logits, x01, reduction="none").flatten(1).sum(1)


def elbo(log_px_given_z, mu, logvar):
    """The two terms of the ELBO ([Luo]; [DiffuseVAE] L_VAE, with the log the document drops):
    (E_q[log p(x|z)] estimated by the given one-sample log-likelihood, KL(q(z|x) || p(z))), each (B,).
    The ELBO is their difference; the training loss is its negative."""
    return log_px_given_z, kl_standard_normal(mu, logvar)


# ----------------------------------------------------------------------------- the networks

def _block(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4 if stride == 2 else 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, 1, 1), nn.GroupNorm(8, c_out), nn.SiLU())


def _up_block(c_in, c_out):
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, 1, 1),
                         nn.GroupNorm(8, c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, 1, 1),
                         nn.GroupNorm(8, c_out), nn.SiLU())


class VAE(nn.Module):
    """Single-stochastic-layer conv VAE ([DiffuseVAE]: the paper keeps the VAE simple on purpose).

    Encoder: image (B, C, S, S) -> S/2, S/4, S/8 feature maps -> (mu, logvar) of a z_dim latent.
    Decoder: z -> (B, 4ch, S/8, S/8) -> upsampled back to (B, C, S, S), the mean of p(x|z).
    """

    def __init__(self, img_ch=1, image_size=32, ch=32, z_dim=32):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be divisible by 8, got {image_size}")
        self.config = dict(img_ch=img_ch, image_size=image_size, ch=ch, z_dim=z_dim)
        s = image_size // 8
        self.enc = nn.Sequential(nn.Conv2d(img_ch, ch, 3, 1, 1), _block(ch, ch, 2), _block(ch, 2 * ch, 2),
                                 _block(2 * ch, 4 * ch, 2), nn.Flatten())
        self.to_stats = nn.Linear(4 * ch * s * s, 2 * z_dim)
        self.from_z = nn.Sequential(nn.Linear(z_dim, 4 * ch * s * s), nn.SiLU())
        self.dec = nn.Sequential(_up_block(4 * ch, 2 * ch), _up_block(2 * ch, ch), _up_block(ch, ch),
                                 nn.Conv2d(ch, img_ch, 3, 1, 1))
        self.obs_logvar = nn.Parameter(torch.tensor(math.log(0.1)))  # log sigma_x^2 of p(x|z)
        self.s, self.ch, self.z_dim = s, ch, z_dim

    def encode(self, x):
        """(B, C, S, S) -> mu, logvar, each (B, z_dim): the parameters of q(z|x)."""
        mu, logvar = self.to_stats(self.enc(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-30, 20)

    def decode(self, z):
        """(B, z_dim) -> (B, C, S, S): the mean of p(x|z), i.e. x_hat_0 = dec(z)."""
        h = self.from_z(z).reshape(z.shape[0], 4 * self.ch, self.s, self.s)
        return self.dec(h)

    def forward(self, x):
        """One-sample ELBO terms for a batch: returns (recon_log_lik (B,), kl (B,), x_hat (B, C, S, S))."""
        mu, logvar = self.encode(x)
        x_hat = self.decode(reparameterize(mu, logvar))
        rec, kl = elbo(gaussian_log_likelihood(x, x_hat, self.obs_logvar), mu, logvar)
        return rec, kl, x_hat

    def loss(self, x):
        """Negative ELBO in nats per dimension, averaged over the batch (the stage-1 training loss)."""
        rec, kl, _ = self(x)
        return (kl - rec).mean() / x[0].numel()

    @torch.no_grad()
    def sample(self, n, generator=None, temperature=1.0, device="cpu"):
        """z ~ N(0, temperature^2 I) -> x_hat_0 = dec(z). Returns (x_hat_0, z)."""
        z = temperature * torch.randn(n, self.z_dim, generator=generator, device=device)
        return self.decode(z), z
