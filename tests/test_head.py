"""Loss terms from a text student's hidden state chunk by chunk (`kd.head`): the same values and
gradients as the terms on whole logits (every logits/labels method), through `training.step` on
a Hugging Face causal LM (tied embeddings included), and the training settings that ride on it
(`precision`, `gradient_checkpointing`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd import head, methods, training
from kd.methods.common import Shapes

pytestmark = pytest.mark.unit

N, H, V, K = 23, 6, 17, 4


def _targets(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-row targets every logits/labels method reads, from a random teacher; labels and
    alignment with gaps (a chunk of rows without any)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    top = teacher.topk(K, dim=1)
    logit = top.values - teacher.max(1, keepdim=True).values
    label = torch.randint(0, V, (N,), generator=g)
    label[:8] = -1  # the first chunks have no label
    aligned = torch.rand(N, generator=g) > 0.3
    aligned[:5] = False
    mapped = top.indices.clone()
    mapped[:, -1] = mapped[:, 0]  # two teacher ids onto one student id
    mapped[::3, 1] = -1  # and unmapped ones
    sample_count = torch.randint(0, 3, (N, 5), generator=g)
    sample_count[:, 0] = 1
    t4 = (teacher - teacher.max(1, keepdim=True).values) / 4
    return {"x": torch.zeros(2, 3), "topk_idx": top.indices, "topk_logit": logit.to(dtype),
            "lse": t4.logsumexp(1).to(dtype), "label": label, "aligned": aligned, "mapped_idx": mapped,
            "lse@4": t4.logsumexp(1).to(dtype), "lse@1": (teacher - teacher.max(1, keepdim=True).values
                                                         ).logsumexp(1).to(dtype),
            "sample_idx": torch.randint(0, V, (N, 5), generator=g), "sample_count": sample_count,
            "entropy": torch.rand(N, generator=g, dtype=dtype)}


def _terms() -> dict[str, tuple[float, training.Term]]:
    """Every logits and labels method's terms as `methods.student_terms` builds them."""
    loss = {"hard": {"weight": 0.2}, "mapped": {"weight": 0.3, "temperature": 4},
            "uld": {"weight": 0.5, "temperature": 1}}
    built = {}
    for name, cfg in loss.items():
        module = methods.METHODS[name]
        built[name] = (module, module.CONFIG(**cfg))
    terms = {}
    for entry in ({"soft": {"weight": 0.5, "temperature": 4}},
                  {"soft": {"weight": 0.5, "temperature": 4, "tail": "renorm"}},
                  {"soft": {"weight": 0.5, "temperature": 4, "targets": "sampled"}}, loss):
        cfg = _student_loss(entry)
        for name, (weight, term) in methods.student_terms(cfg, Shapes({}, {})).terms.items():
            terms[f"{name}-{len(terms)}"] = (weight, term)
    return terms


def _student_loss(loss: dict) -> object:
    from kd.config import StudentConfig, from_mapping
    return from_mapping(StudentConfig, {"arch": "gpt2", "loss": loss, "name": "s", "section": "text_students"},
                        "text_students.s")


@pytest.mark.parametrize(("dtype", "rtol", "atol"), [(torch.float64, 1e-10, 1e-12), (torch.float32, 2e-4, 2e-5)])
@pytest.mark.parametrize("bias", [False, True])
def test_from_hidden_equals_terms_on_whole_logits(dtype, rtol, atol, bias):
    batch = _targets(dtype)
    terms = _terms()
    assert all(isinstance(term, training.RowMean) for _, term in terms.values())
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, H, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=dtype, requires_grad=True) if bias else None
    inputs = [hidden, weight] + ([b] if bias else [])

    def whole():
        logits = F.linear(hidden, weight, b)
        return {name: term(batch, {"logits": logits}) for name, (_, term) in terms.items()}

    def chunked():  # 3 rows a chunk: 8 chunks, the first ones without labels or aligned rows
        return head.from_hidden(hidden, weight, b, batch, {name: (t, t.rows) for name, (_, t) in terms.items()},
                                chunk_elements=3 * V)

    expected, got = whole(), chunked()
    for name in terms:
        # mapped (ids merged) and uld compute in float32 whatever the logits' dtype
        tol = {"rtol": rtol, "atol": atol} if expected[name].dtype == dtype else {"rtol": 2e-4, "atol": 2e-5}
        torch.testing.assert_close(got[name], expected[name].to(got[name].dtype), **tol)
        want = torch.autograd.grad(expected[name], inputs, allow_unused=True, retain_graph=True)
        have = torch.autograd.grad(got[name], inputs, allow_unused=True, retain_graph=True)
        for a, e in zip(have, want):
            torch.testing.assert_close(a, e, **tol, msg=name)


def test_from_hidden_gradcheck():
    """The chunked backward is the derivative of the chunked forward (float64; soft and hard, the others
    are the same code)."""
    batch = {k: v[:10] for k, v in _targets(torch.float64, seed=3).items()}  # 10 rows: 2 without a label
    terms = {name: (t, t.rows) for name, (_, t) in _terms().items() if name.startswith(("soft-0", "hard"))}
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(10, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w, bb: torch.stack(list(head.from_hidden(h, w, bb, batch, terms, chunk_elements=4 * V).values())),
        (hidden, weight, b))


def test_no_selected_rows_gives_zero_and_no_gradient():
    batch = _targets(torch.float64)
    batch["label"][:] = -1
    hard = methods.student_terms(_student_loss({"hard": {"weight": 1}}), Shapes({}, {})).terms["hard"][1]
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    value = head.from_hidden(hidden, weight, None, batch, {"hard": (hard, hard.rows)})["hard"]
    assert value.item() == 0.0
    value.backward()
    assert not hidden.grad.any() and not weight.grad.any()


def test_bf16_projection_keeps_float32_terms():
    """compute_dtype bfloat16 (precision bf16-mixed): the terms are float32, near the float32 ones."""
    batch = _targets(torch.float32)
    terms = {name: (t, t.rows) for name, (_, t) in _terms().items()}
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    exact = head.from_hidden(hidden, weight, None, batch, terms)
    low = head.from_hidden(hidden, weight, None, batch, terms, compute_dtype=torch.bfloat16)
    for name in terms:
        assert low[name].dtype == torch.float32
        torch.testing.assert_close(low[name], exact[name], rtol=0.05, atol=0.05)
    sum(low.values()).backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32


def _tiny_llama(tied: bool, seed: int = 0, **fields):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V * 3, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=tied, **fields)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_step_from_hidden_equals_step_on_logits(tied, masked):
    """`training.step` on a causal LM (`TokenRows`): its terms from the hidden state (RowMean) give
    the values and parameter gradients of the same terms on its logits (plain callables)."""
    from kd.tasks.next_token import TokenRows, model_input

    model = TokenRows(_tiny_llama(tied)).double()
    assert model.output_layer() is not None and (model.output_layer().weight is
                                                 model.model.get_input_embeddings().weight) == tied
    g = torch.Generator().manual_seed(4)
    blocks = torch.randint(0, V * 3, (3, 9), generator=g)
    predicted = torch.rand(3, 8, generator=g) > 0.4 if masked else None
    x = model_input(blocks, predicted)
    rows = len(model(x))
    global N  # the targets' row count follows the blocks
    saved, N = N, rows
    try:
        batch = _targets(torch.float64)
    finally:
        N = saved
    batch["topk_idx"] = batch["topk_idx"] * 3  # ids across the student's vocabulary
    batch["x"] = x
    terms = {name: (w, t) for name, (w, t) in _terms().items() if not name.startswith(("mapped", "uld"))}
    model.train()
    (values, grad), (expected, want) = _step_from_hidden_and_logits(model, batch, terms)
    for name in terms:
        torch.testing.assert_close(values[name], expected[name], rtol=1e-10, atol=1e-12)
    for name in want:
        torch.testing.assert_close(grad[name], want[name], rtol=1e-9, atol=1e-12, msg=name)


def test_soft_capped_logits_train_on_logits():
    """A model whose logits are more than its output layer (Gemma 2's soft-capping) has no output
    layer to chunk: `step` trains it on its logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from kd.tasks.next_token import TokenRows

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, head_dim=8,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                          final_logit_softcapping=0.5)
    assert TokenRows(Gemma2ForCausalLM(config)).output_layer() is None
    config.final_logit_softcapping = None
    assert TokenRows(Gemma2ForCausalLM(config)).output_layer() is not None


def test_masked_lm_step_from_hidden_equals_step_on_logits():
    """A BERT student (`MaskedRows`): its terms from the state before the decoder (after BERT's
    head transform) equal the same terms on its logits, values and gradients (decoder bias included)."""
    from transformers import BertConfig, BertForMaskedLM

    from kd.tasks.masked_lm import MaskedRows

    torch.manual_seed(0)
    config = BertConfig(vocab_size=V * 3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = MaskedRows(BertForMaskedLM(config), block_size=10).double()
    assert model.output_layer() is model.model.cls.predictions.decoder
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, V * 3, (3, 10), generator=g)
    positions = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(3)])
    x = torch.cat([tokens, positions], 1)
    global N
    saved, N = N, 12
    try:
        batch = _targets(torch.float64)
    finally:
        N = saved
    batch["x"] = x
    terms = {name: (w, t) for name, (w, t) in _terms().items() if not name.startswith(("mapped", "uld"))}
    (values, grad), (expected, want) = _step_from_hidden_and_logits(model, batch, terms)
    assert grad.keys() == want.keys()
    for name in terms:
        torch.testing.assert_close(values[name], expected[name], rtol=1e-10, atol=1e-12)
    for name in want:
        torch.testing.assert_close(grad[name], want[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_gradient_computed_in_the_forward_is_the_projected_again_one(dtype):
    """With the loss weights given (`training.update`'s path), the forward also computes the
    weighted terms' gradient, and the backward hands it on: the same bits as projecting each chunk
    again, for the loss's own weights (x 1), a multiple of them, and (falling back) any other
    incoming gradient."""
    batch = _targets(dtype)
    terms = _terms()
    weights = [weight for weight, _ in terms.values()]
    g = torch.Generator().manual_seed(4)
    hidden0 = torch.randn(N, H, generator=g, dtype=dtype)
    weight0 = torch.randn(V, H, generator=g, dtype=dtype)
    bias0 = torch.randn(V, generator=g, dtype=dtype)

    def run(loss_weights, incoming):
        inputs = [t.clone().requires_grad_() for t in (hidden0, weight0, bias0)]
        values = head.from_hidden(*inputs, batch, {name: (t, t.rows) for name, (_, t) in terms.items()},
                                  chunk_elements=3 * V, loss_weights=loss_weights)
        stacked = torch.stack(list(values.values()))
        stacked.backward(incoming.to(stacked.dtype))
        return stacked.detach(), [t.grad for t in inputs]

    loss = torch.tensor(weights, dtype=torch.float32)
    for incoming in (loss, 3 * loss, torch.arange(len(weights), dtype=torch.float32)):
        expected, want = run(None, incoming)
        got, have = run(weights, incoming)
        assert torch.equal(got, expected)
        for a, e in zip(have, want):
            if incoming is loss:
                assert torch.equal(a, e)
            else:
                torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def _step_from_hidden_and_logits(model, batch, terms):
    """`training.step` and its weighted backward with `terms` (RowMean: from the hidden state) and
    with their plain terms (on the logits): [(values, parameter gradients)] for each, in that order."""
    plain = {name: (w, t.term) for name, (w, t) in terms.items()}
    results = []
    for these in (terms, plain):
        model.zero_grad()
        values = training.step(model, batch, these, [])
        sum(w * values[name] for name, (w, _) in these.items()).backward()
        results.append(({k: v.detach() for k, v in values.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return results
