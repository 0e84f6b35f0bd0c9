"""Free-running text generation with a ``Llama`` decoder: block-chain diffusion and next-token.

Block-wise autoregressive diffusion (method spec, section 6): for every new token, start from
noise at sigma_max and integrate down the sigma grid; each solver step calls only the block that
owns the current sigma (``EDMDenoiser``), with the clean prefix as context. The denoised estimate
a solver sees is softmax(logits) @ E with the same normalised table the model was trained on; the
token is taken from the logits of the LAST denoiser call (argmax, or a sample at ``temperature``).

With ``use_cache`` each block keeps the keys/values of its own clean stream (``KVCache``): the
prompt is run once per block, each new token is appended once per block, and a solver step costs
one noisy row attending to the cache. Without it every step recomputes the whole prefix (the
reference the cache is tested against). A network whose blocks chain their clean stream
(``dbl.models.blockwise``: a pretrained decoder) has one clean stream through all layers, so one
cache, extended through all layers, serves every block.

The next-token baseline's decoding is here too, so that both sides of the comparison decode
with the same ``pick_token``.
"""

from __future__ import annotations

import torch

from dbl.denoisers.edm import EDMDenoiser
from dbl.diffusion.draws import Generators, multinomial, randn
from dbl.diffusion.samplers import sample
from dbl.models.blockwise import BlockwiseNetwork
from dbl.models.llama import ARInput, KVCache


def pick_token(logits: torch.Tensor, temperature: float, generator: Generators, top_p: float = 1.0) -> torch.Tensor:
    """[N, V] -> [N]: argmax when ``temperature`` is 0, else a sample from softmax(logits / temperature)
    restricted to its nucleus: the most likely tokens whose probability first reaches ``top_p``
    (renormalised; the most likely token is always kept).

    Sampling draws on the CPU so that a CPU ``generator`` (or one per sample) gives the same tokens
    on any device.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1).cpu()
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return multinomial(probs, generator).to(logits.device)


def _check_prompt(prompt: torch.Tensor) -> None:
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [N, p] with p >= 1 (start with a BOS token), got {tuple(prompt.shape)}")


def _extend_prefix(network: BlockwiseNetwork, block: int | None, tokens: torch.Tensor, cache: KVCache) -> None:
    """Append ``tokens`` [N, m] to ``block``'s clean stream in ``cache`` (None: all layers)."""
    layers = network.net.layers if block is None else network.block_layers(block)
    h, c = network.io(block or 0).embed(None, None, ARInput(tokens, cache=cache, store=True))
    for layer in layers:
        h = layer(h, c)


@torch.no_grad()
def generate_ar_diffusion(
    denoiser: EDMDenoiser,
    prompt: torch.Tensor,
    num_tokens: int,
    sigmas: torch.Tensor,
    solver: str = "euler",
    temperature: float = 0.0,
    generator: Generators = None,
    use_cache: bool = True,
    top_p: float = 1.0,
    hook=None,
) -> torch.Tensor:
    """Continue ``prompt`` [N, p] (p >= 1) by ``num_tokens`` tokens; returns [N, num_tokens].

    ``sigmas``: the descending grid ending in 0 (``EDMDenoiser.sigmas``). ``hook``: wraps the denoiser
    each token's solver calls (``dbl.diagnose.StepRecorder`` records the steps).
    """
    _check_prompt(prompt)
    network = denoiser.network
    net = network.net
    n, device = prompt.shape[0], prompt.device
    if getattr(net, "chained_clean_stream", False):
        shared = KVCache()
        caches, streams = [shared] * network.num_blocks, [(None, shared)]
    else:
        caches = [KVCache() for _ in range(network.num_blocks)]
        streams = list(enumerate(caches))
    if use_cache:
        for block, cache in streams:
            _extend_prefix(network, block, prompt, cache)
    tokens = prompt
    for _ in range(num_tokens):
        position = tokens.shape[1]
        last_logits: list[torch.Tensor] = []

        def estimate(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            block = denoiser.block_at(sigma)
            if use_cache:
                cond = ARInput(None, noisy_start=position, cache=caches[block])
            else:
                cond = ARInput(tokens, noisy_start=position)
            logits = net.denoised_logits(denoiser(z, sigma, cond, block=block))
            last_logits[:] = [logits]
            table = net.token_table()
            return logits.softmax(-1).to(table.dtype) @ table

        noise = randn((n, 1, net.hidden_size), generator).to(device=device, dtype=net.embedding.weight.dtype)
        sample(estimate if hook is None else hook(estimate), noise, sigmas, solver, generator)
        new = pick_token(last_logits[0][:, -1], temperature, generator, top_p)
        tokens = torch.cat([tokens, new[:, None]], dim=1)
        if use_cache:
            for block, cache in streams:
                _extend_prefix(network, block, new[:, None], cache)
    return tokens[:, prompt.shape[1]:]


@torch.no_grad()
def generate_next_token(
    network: BlockwiseNetwork,
    prompt: torch.Tensor,
    num_tokens: int,
    temperature: float = 0.0,
    generator: Generators = None,
    use_cache: bool = True,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Ordinary autoregressive decoding of an end-to-end next-token model; returns [N, num_tokens]."""
    _check_prompt(prompt)
    cache = KVCache() if use_cache else None
    tokens, step_input = prompt, prompt
    for _ in range(num_tokens):
        if use_cache:
            logits = network(None, None, ARInput(step_input, cache=cache, store=True))
        else:
            logits = network(None, None, ARInput(tokens))
        new = pick_token(logits[:, -1], temperature, generator, top_p)
        tokens, step_input = torch.cat([tokens, new[:, None]], dim=1), new[:, None]
    return tokens[:, prompt.shape[1]:]
