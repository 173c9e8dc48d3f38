"""The torch reference runtime: batched greedy decoding gives what one prompt at a time gives."""

import pytest


@pytest.fixture(scope="module")
def rt(tiny_llama_dir):
    from edgeft.runtime.hf import HFRuntime

    return HFRuntime(tiny_llama_dir, n_threads=1)


def test_batched_greedy_equals_one_prompt_at_a_time(rt):
    # lengths 1..13 in a scrambled order: left padding of up to 12 positions, batches of 3 sorted by length
    prompts = [[1] + [(7 * i + 3 * j) % 200 + 2 for j in range(n)] for i, n in enumerate((12, 0, 5, 9, 3, 7, 1))]
    single = [rt.generate(p, 6) for p in prompts]
    batched = rt.generate_batch(prompts, 6, batch_size=3)
    assert [g.tokens for g in batched] == [g.tokens for g in single]
    assert [g.prompt_tokens for g in batched] == [len(p) for p in prompts]
    assert all(g.ttft_s > 0 for g in batched)


def test_batched_rows_stop_at_their_own_eos(rt):
    prompts = [[1, 5, 9], [1, 40, 41, 42, 43]]
    free = [rt.generate(p, 5, ignore_eos=True).tokens for p in prompts]
    # make the first row's third greedy token its EOS: that row stops there, the other runs to the cap
    eos, rt.eos_ids = rt.eos_ids, {free[0][2]} - set(free[1])
    try:
        single = [rt.generate(p, 5) for p in prompts]
        batched = rt.generate_batch(prompts, 5)
    finally:
        rt.eos_ids = eos
    assert single[0].stopped_at_eos and single[0].tokens == free[0][:2]
    assert [(g.tokens, g.stopped_at_eos) for g in batched] == [(g.tokens, g.stopped_at_eos) for g in single]
