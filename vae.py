"""The VAE: reparameterisation, the KL, the likelihood, the ELBO, the networks, the ex-post prior.

Sources: Kingma & Welling 2014 (arXiv:1312.6114); Luo 2022 (arXiv:2208.11970, "Background: ELBO,
VAE"); DiffuseVAE (arXiv:2201.00308), whose generator is such a one-stochastic-layer VAE:
log p(x) = ELBO + KL(q(z|x) || p(z|x)) >= ELBO = E_q[log p(x|z)] - KL(q(z|x) || N(0, I)).
The decoder is Gaussian with one learned variance (the "sigma-VAE"), so the ELBO needs no hand-set
weight between its terms. Images are in [-1, 1].
"""

import math

import torch
import torch.nn as nn

LOG_2PI = math.log(2 * math.pi)


# --- the math -----------------------------------------------------------------------------------


def reparameterize(mu, logvar, eps=None):
    """z = mu + sigma * eps, eps ~ N(0, I): a differentiable draw from q(z|x) = N(mu, sigma^2)
    (Kingma & Welling 2014, §2.4)."""
    eps = torch.randn_like(mu) if eps is None else eps
    return mu + torch.exp(0.5 * logvar) * eps


def kl_standard_normal(mu, logvar):
    """KL(N(mu, diag sigma^2) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2), per example
    (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def kl_to_prior(mu, logvar, z, prior=None):
    """KL(q(z|x) || p(z)) per example (B,), q(z|x) = N(mu, diag e^logvar): in closed form for p(z) =
    N(0, I) (prior None); for the ex-post mixture, which has no closed form, the one-draw estimate
    log q(z|x) - log p(z) at the draw z ~ q(z|x) that the bound decodes (unbiased: Kingma & Welling
    2014, arXiv:1312.6114, estimator A)."""
    if prior is None:
        return kl_standard_normal(mu, logvar)
    return gaussian_log_likelihood(z, mu, logvar) - gmm_log_prob(z, prior).to(z.dtype)


def gaussian_log_likelihood(x, mean, logvar):
    """log N(x; mean, e^logvar I), summed over dimensions, per example (B,). logvar broadcasts."""
    logvar = torch.as_tensor(logvar, dtype=x.dtype, device=x.device).expand_as(x)
    return (-0.5 * (LOG_2PI + logvar + (x - mean).pow(2) * torch.exp(-logvar))).flatten(1).sum(1)


def negative_elbo(x, x_hat, obs_logvar, mu, logvar):
    """-ELBO = -E_q[log p(x|z)] + KL(q(z|x) || N(0, I)) per example (B,), in nats (the negative of
    DiffuseVAE's L_VAE), E_q estimated by the one draw z that decoded to x_hat: p(x|z) = N(x_hat,
    e^obs_logvar I)."""
    return kl_standard_normal(mu, logvar) - gaussian_log_likelihood(x, x_hat, obs_logvar)


# --- the networks -------------------------------------------------------------------------------


def block(c_in, c_out, up=False):
    """A 4x4 stride-2 conv (or nearest x2 and a 3x3 conv, up), then a 3x3 conv, each followed by
    GroupNorm(8) and SiLU: (B, c_in, S, S) -> (B, c_out, S/2, S/2) (or 2S, 2S)."""
    if up:
        first = [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, 1, 1)]
    else:
        first = [nn.Conv2d(c_in, c_out, 4, 2, 1)]
    second = [nn.GroupNorm(8, c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, 1, 1)]
    return nn.Sequential(*first, *second, nn.GroupNorm(8, c_out), nn.SiLU())


class VAE(nn.Module):
    """A one-stochastic-layer conv VAE. Encoder: (B, C, S, S) -> S/2, S/4, S/8 feature maps ->
    (mu, logvar) of a z_dim latent. Decoder: z -> (B, 4ch, S/8, S/8) -> (B, C, S, S), the mean of
    p(x|z)."""

    def __init__(self, img_ch=1, image_size=32, ch=32, z_dim=32):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be divisible by 8, got {image_size}")
        self.config = dict(img_ch=img_ch, image_size=image_size, ch=ch, z_dim=z_dim)
        s, c = image_size // 8, 4 * ch
        stem = nn.Conv2d(img_ch, ch, 3, 1, 1)
        down = [block(ch, ch), block(ch, 2 * ch), block(2 * ch, c)]
        self.enc = nn.Sequential(stem, *down, nn.Flatten())
        self.to_stats = nn.Linear(c * s * s, 2 * z_dim)
        self.from_z = nn.Sequential(nn.Linear(z_dim, c * s * s), nn.SiLU())
        up = [block(c, 2 * ch, up=True), block(2 * ch, ch, up=True), block(ch, ch, up=True)]
        self.dec = nn.Sequential(*up, nn.Conv2d(ch, img_ch, 3, 1, 1))
        self.obs_logvar = nn.Parameter(torch.tensor(math.log(0.1)))  # log sigma_x^2 of p(x|z)
        self.s, self.ch, self.z_dim = s, ch, z_dim
        self.prior = None  # the ex-post mixture z is sampled from (fit_expost_prior); None: N(0, I)

    @classmethod
    def from_checkpoint(cls, ck):
        """The frozen VAE of a stage-1 checkpoint, or of a stage-2 checkpoint's "vae" entry
        (runtime.py): its EMA weights and its ex-post prior."""
        vae = cls(**ck["model_args"])
        vae.load_state_dict(ck["ema"])
        vae.prior = ck.get("prior")  # None before stage 1's last step
        return vae.eval().requires_grad_(False)

    def encode(self, x):
        """(B, C, S, S) -> mu, logvar, each (B, z_dim): the parameters of q(z|x)."""
        mu, logvar = self.to_stats(self.enc(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-30, 20)

    def decode(self, z):
        """(B, z_dim) -> (B, C, S, S): the mean of p(x|z), i.e. x_hat_0 = dec(z)."""
        h = self.from_z(z).reshape(z.shape[0], 4 * self.ch, self.s, self.s)
        return self.dec(h)

    def reconstruct(self, x, generator=None):
        """x_hat = dec(z), z ~ q(z|x), and (mu, logvar, z): the draw of the ELBO, of the refiner's
        training condition x_hat_0 and of the bound."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = reparameterize(mu, logvar, eps)
        return self.decode(z), (mu, logvar, z)

    def forward(self, x):
        """The stage-1 loss: the one-sample negative ELBO of each image in nats per dimension,
        (B,)."""
        x_hat, (mu, logvar, _) = self.reconstruct(x)
        return negative_elbo(x, x_hat, self.obs_logvar, mu, logvar) / x[0].numel()


# --- the ex-post prior (Ghosh et al. 2020, arXiv:1903.12436) ------------------------------------
# A z ~ N(0, I) can land where no training image's q(z|x) puts mass and decode to an odd image: z
# is sampled from a full-covariance Gaussian mixture fitted by EM to one z ~ q(z|x) per image.


def gmm_log_prob(z, prior):
    """log sum_k w_k N(z; m_k, S_k) per row of z (N, d) -> (N,); `prior` = dict(weights, means,
    covs)."""
    return torch.logsumexp(_component_log_probs(z.double(), prior), dim=1)


def _component_log_probs(z, prior):
    """log w_k + log N(z_n; m_k, S_k), (N, k), through the Cholesky factor S_k = L_k L_k^T."""
    L = torch.linalg.cholesky(prior["covs"])  # (k, d, d)
    diff = (z[:, None, :] - prior["means"][None]).permute(1, 2, 0)  # (k, d, N)
    mahalanobis = torch.linalg.solve_triangular(L, diff, upper=False).pow(2).sum(1).T  # (N, k)
    log_det = 2 * torch.diagonal(L, dim1=-2, dim2=-1).log().sum(-1)  # (k,)
    return prior["weights"].log() - 0.5 * (z.shape[1] * LOG_2PI + log_det + mahalanobis)


def fit_gmm(z, k=10, iters=300, tol=1e-3, reg=1e-6, generator=None):
    """Maximum-likelihood k-component Gaussian mixture for the rows of z (N, d) by EM (Dempster et
    al. 1977). E step: responsibilities r_nk = p(component k | z_n). M step: w_k, m_k, S_k = the
    r-weighted fraction, mean and covariance (+ reg I, so S_k stays invertible). Without reg, an EM
    step never lowers the mean log-likelihood. Stops when a step raises it by less than tol nats
    per point (scikit-learn's criterion). Starts from k distinct data points as means.
    Returns (prior dict of float64 tensors, [mean log-lik per step])."""
    z = z.detach().double().cpu()
    n, d = z.shape
    if n < k:
        raise ValueError(f"fit_gmm needs at least k = {k} points, got {n}")
    eye = torch.eye(d, dtype=z.dtype)
    means = z[torch.randperm(n, generator=generator)[:k]].clone()
    covs = (torch.cov(z.T).reshape(d, d) + reg * eye).expand(k, d, d).clone()
    prior = dict(weights=torch.full((k,), 1.0 / k, dtype=z.dtype), means=means, covs=covs)
    history = []
    for _ in range(iters):
        log_p = _component_log_probs(z, prior)  # (N, k)
        log_lik = torch.logsumexp(log_p, dim=1, keepdim=True)
        history.append(log_lik.mean().item())
        r = (log_p - log_lik).exp()  # E step, (N, k)
        nk = r.sum(0) + 1e-12
        means = (r.T @ z) / nk[:, None]  # M step
        # S_k = sum_n r_nk (z_n - m_k)(z_n - m_k)^T / n_k, one (d, N) @ (N, d) product per component
        covs = torch.stack([((z - m) * r[:, j, None]).T @ (z - m) for j, m in enumerate(means)])
        covs = covs / nk[:, None, None] + reg * eye
        prior = dict(weights=nk / n, means=means, covs=covs)
        if len(history) > 1 and history[-1] - history[-2] < tol:
            break
    history.append(gmm_log_prob(z, prior).mean().item())
    return prior, history


def sample_prior(n, z_dim, prior=None, temperature=1.0, generator=None, device="cpu"):
    """z for the decoder: N(0, temperature^2 I), or with an ex-post `prior` a draw from the mixture
    with each component's spread scaled by temperature: z = m_k + temperature L_k eps, k ~
    Categorical(w)."""
    eps = torch.randn(n, z_dim, generator=generator, device=device)
    if prior is None:
        return temperature * eps
    weights = prior["weights"].float().to(device)
    k = torch.multinomial(weights, n, replacement=True, generator=generator)
    L = torch.linalg.cholesky(prior["covs"]).to(device=device, dtype=eps.dtype)
    means = prior["means"].to(device=device, dtype=eps.dtype)
    return means[k] + temperature * torch.einsum("nij,nj->ni", L[k], eps)


@torch.no_grad()
def encode_dataset(vae, images, batch_size=500):
    """q(z|x) = N(mu, diag e^logvar) of every uint8 image (N, C, S, S): (mu, logvar), each (N,
    z_dim) float32 on the CPU: the ex-post prior is fitted to draws from them."""
    from data import to_model_range

    device = next(vae.parameters()).device
    mus, logvars = [], []
    for i in range(0, len(images), batch_size):
        mu, logvar = vae.encode(to_model_range(images[i : i + batch_size]).to(device))
        mus.append(mu.float().cpu()), logvars.append(logvar.float().cpu())
    return torch.cat(mus), torch.cat(logvars)


def fit_expost_prior(vae, images, k=10, batch_size=500, generator=None):
    """Draw one z ~ q(z|x) for each uint8 image (N, C, S, S), fit the k-component mixture to them.
    Returns (prior, mean log-likelihood of the codes under it per latent dimension)."""
    mu, logvar = encode_dataset(vae, images, batch_size)
    z = reparameterize(mu, logvar, torch.randn(mu.shape, generator=generator))
    prior, history = fit_gmm(z, k=k, generator=generator)
    return prior, history[-1] / vae.z_dim
