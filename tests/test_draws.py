"""Generation with one random stream per sample: a sample does not depend on its batch."""

import torch
from conftest import tiny_dit
from test_lm1b import tiny_llama

from dbl.diffusion.draws import multinomial, per_sample_generators, randn
from dbl.training.autoregressive import ARDiffusionLMModule
from dbl.training.image import ImageDiffusionModule


def test_sample_i_draws_the_same_numbers_in_any_batch():
    whole = randn((6, 3), per_sample_generators(5, range(6)))
    parts = torch.cat([randn((2, 3), per_sample_generators(5, range(0, 2))),
                       randn((4, 3), per_sample_generators(5, range(2, 6)))])
    assert torch.equal(whole, parts)
    # the stream is (seed, index)'s own: a neighbour's index or seed gives other numbers
    alone = randn((1, 3), per_sample_generators(5, [3]))
    assert torch.equal(alone[0], whole[3])
    assert not torch.equal(randn((1, 3), per_sample_generators(6, [3]))[0], whole[3])
    assert not torch.equal(randn((1, 3), per_sample_generators(5, [4]))[0], whole[3])
    probs = torch.full((6, 50), 1 / 50)
    tokens = multinomial(probs, per_sample_generators(5, range(6)))
    assert torch.equal(tokens[3:], multinomial(probs[3:], per_sample_generators(5, range(3, 6))))


def test_image_samples_do_not_depend_on_the_batch_with_a_stochastic_solver():
    torch.manual_seed(0)
    module = ImageDiffusionModule(tiny_dit(num_classes=10, class_dropout_prob=0.1), num_blocks=3, sample_steps=4,
                                  sample_solver="euler_ancestral").eval()
    labels = torch.tensor([1, 4, 4, 9, 0])
    whole = module.sample(labels=labels, generator=per_sample_generators(2, range(5)))
    parts = [module.sample(labels=labels[i:j], generator=per_sample_generators(2, range(i, j))) for i, j in ((0, 2), (2, 5))]
    torch.testing.assert_close(whole, torch.cat(parts), rtol=1e-5, atol=1e-5)
    # the fresh noise of each step is per sample too: another seed for sample 0 alone changes only it
    other = module.sample(labels=labels[:1], generator=per_sample_generators(3, [0]))
    assert (other - whole[:1]).abs().max() > 1e-2


def test_continuations_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    module = ARDiffusionLMModule(tiny_llama(), num_blocks=2, sample_steps=3, temperature=1.0).eval()
    prompt = torch.randint(5, 40, (4, 3))
    whole = module.generate(prompt, 5, generator=per_sample_generators(1, range(4)))
    parts = torch.cat([module.generate(prompt[i:j], 5, generator=per_sample_generators(1, range(i, j)))
                       for i, j in ((0, 1), (1, 4))])
    assert torch.equal(whole, parts)
