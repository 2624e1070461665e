import torch

from turnrl.models import Policy, build_tiny_tokenizer, load_policy


def test_tiny_tokenizer_roundtrips_any_text(tiny_tokenizer):
    text = "P_O√\n#X S\tünïcödé 🙂 <answer>Right || Up</answer>"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


def test_chat_template_and_special_tokens(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tiny_tokenizer.eos_token_id in ids


def test_same_seed_same_weights():
    a, b = load_policy("tiny", seed=3), load_policy("tiny", seed=3)
    c = load_policy("tiny", seed=4)
    pa, pb, pc = (next(p.lm.parameters()) for p in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_save_and_load_roundtrip(tmp_path):
    policy = load_policy("tiny", value_head=True, seed=1)
    with torch.no_grad():
        policy.value_head.bias.fill_(0.5)
    policy.save(tmp_path / "m")
    again = load_policy(str(tmp_path / "m"), value_head=True)
    ids = torch.tensor([[256, 70, 71, 72]])
    l1, v1 = policy(ids, with_values=True)
    l2, v2 = again(ids, with_values=True)
    assert torch.allclose(l1, l2, atol=1e-5) and torch.allclose(v1, v2)
    assert again.tokenizer.chat_template == policy.tokenizer.chat_template


def test_value_head_shape():
    policy = Policy(load_policy("tiny").lm, build_tiny_tokenizer(), value_head=True)
    logits, values = policy(torch.tensor([[1, 2, 3]]), with_values=True)
    assert logits.shape[:2] == (1, 3) and values.shape == (1, 3)


def test_logits_at_marked_positions_equal_the_full_logits():
    """`at` runs the LM head only at the marked positions; logits and values equal the whole LM's."""
    from turnrl.lm_parts import lm_parts

    policy = load_policy("tiny", value_head=True, seed=2).eval()
    with torch.no_grad():
        policy.value_head.weight.normal_()
    ids = torch.randint(0, 200, (3, 9))
    attn = torch.ones_like(ids)
    attn[2, 6:] = 0
    at = torch.rand(3, 9) < 0.4
    with torch.no_grad():
        out = policy.lm(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        logits, values = policy(ids, attn, with_values=True, at=at)
        full, _ = policy(ids, attn)
    assert lm_parts(policy.lm).split
    assert logits.shape == (int(at.sum()), out.logits.shape[-1])
    torch.testing.assert_close(logits, out.logits[at])
    torch.testing.assert_close(full, out.logits)
    torch.testing.assert_close(values, policy.value_head(out.hidden_states[-1]).squeeze(-1))


def scale_logits(lm, factor: float = 0.5) -> None:
    """Makes `lm` post-process its logits (scaled, like soft-capping), so that turnrl.lm_parts cannot split it."""
    real = lm.forward

    def scaled(*args, **kwargs):
        out = real(*args, **kwargs)
        out.logits = out.logits * factor
        return out

    lm.forward = scaled


def test_model_whose_logits_are_not_the_plain_head_keeps_the_whole_lm_path():
    """A model that post-processes its logits (here: scaled, like soft-capping) is not split: `at` then selects
    from the whole LM's own logits, so nothing changes for such models."""
    from turnrl.lm_parts import lm_parts

    policy = load_policy("tiny", seed=2).eval()
    scale_logits(policy.lm)
    ids = torch.randint(0, 200, (2, 6))
    at = torch.zeros(2, 6, dtype=torch.bool)
    at[:, 3:] = True
    with torch.no_grad():
        logits, _ = policy(ids, torch.ones_like(ids), at=at)
        expected = policy.lm(input_ids=ids).logits[at]
    assert not lm_parts(policy.lm).split
    torch.testing.assert_close(logits, expected)
