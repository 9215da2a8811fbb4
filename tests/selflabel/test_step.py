"""SelfLabeling: one step against an independent recomputation, state, gradients, autocast and no host syncs."""

import collections

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)

from cpsl_hf.selflabel import SelfLabeling, class_balanced_sample

IGNORE = 255
C, D, M, TAU = 4, 6, 5, 0.08


def float64_sinkhorn(scores: np.ndarray, prior: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    q = np.exp(scores / epsilon)
    q /= q.sum()
    for _ in range(iterations):
        q *= (prior / prior.sum() / q.sum(axis=0))[None, :]
        q *= (1.0 / len(q) / q.sum(axis=1))[:, None]
    return q * len(q)


def make_batch(seed, num_images=2, height=3, width=4):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num_images, D, height, width, generator=generator)
    p_st = torch.softmax(3 * torch.randn(num_images, C, height, width, generator=generator), dim=1)
    valid = torch.ones(num_images, height, width, dtype=torch.bool)
    valid[1].view(-1)[3:] = False  # image 1 keeps 3 < M labelled pixels: padding samples
    return z, p_st, valid


def test_step_matches_independent_computation():
    torch.manual_seed(0)
    module = SelfLabeling(C, D, num_samples=M, bank_size=12, prior_momentum=0.9, temperature=TAU)
    module.initialize_prior(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    teacher_w = torch.randn(C, D)
    student_w = torch.nn.Parameter(teacher_w + 0.3 * torch.randn(C, D))
    bank_model = collections.deque(maxlen=12)
    prior = np.array([0.4, 0.3, 0.2, 0.1])
    for step in range(4):  # 10 samples per step into a bank of 12: fills, then wraps
        z, p_st, valid = make_batch(step)
        out = module(
            z, p_st, teacher_w, student_w, valid_mask=valid, generator=torch.Generator().manual_seed(step)
        )

        # rectified labels
        zn = F.normalize(z.double(), dim=1)
        p_sl = torch.softmax(
            torch.einsum("ndhw,cd->nchw", zn, F.normalize(teacher_w.double(), dim=1)) / TAU, 1
        )
        labels = torch.where(valid, (p_sl * p_st.double()).argmax(1), IGNORE)
        torch.testing.assert_close(out.labels, labels, rtol=0, atol=0)
        torch.testing.assert_close(out.sl_probs.double(), p_sl, rtol=1e-5, atol=1e-6)

        # sampling is the public sampler with the same generator
        indices, sample_valid = class_balanced_sample(labels, M, IGNORE, torch.Generator().manual_seed(step))
        torch.testing.assert_close(out.sample_indices, indices)
        torch.testing.assert_close(out.sample_valid, sample_valid)
        assert sample_valid[0].all() and sample_valid[1].sum() == 3

        # Sinkhorn over the filled bank rows and the valid current samples only
        rows = zn.permute(0, 2, 3, 1).reshape(2, -1, D)
        current = [rows[n, indices[n, m]] for n in range(2) for m in range(M) if sample_valid[n, m]]
        bank_rows = [row for row, ok in bank_model if ok]
        stacked = torch.stack(bank_rows + current).numpy()
        scores = stacked @ F.normalize(student_w.detach().double(), dim=1).numpy().T
        q_expected = float64_sinkhorn(scores, prior, 0.05, 3)[len(bank_rows) :]
        np.testing.assert_allclose(out.q[sample_valid].double().numpy(), q_expected, rtol=2e-4, atol=1e-6)
        assert (out.q[~sample_valid] == 0).all()

        # the loss: cross-entropy of the student's cosine scores (teacher embeddings) against q
        logits = (
            torch.from_numpy(np.stack([c.numpy() for c in current]))
            @ F.normalize(student_w.double(), dim=1).t()
        )
        expected_loss = -(torch.from_numpy(q_expected) * torch.log_softmax(logits / TAU, 1)).sum(1).mean()
        torch.testing.assert_close(out.loss.double(), expected_loss, rtol=1e-4, atol=1e-6)

        # the bank received every sample (padding as invalid), the prior the batch histogram
        for n in range(2):
            for m in range(M):
                bank_model.append((rows[n, indices[n, m]], bool(sample_valid[n, m])))
        torch.testing.assert_close(module.bank.get().double(), torch.stack([r for r, ok in bank_model if ok]))
        histogram = np.bincount(labels[labels != IGNORE].numpy(), minlength=C)
        prior = 0.9 * prior + 0.1 * histogram / histogram.sum()
        np.testing.assert_allclose(module.prior.distribution.numpy(), prior, rtol=1e-6)

        # diagnostics
        labelled = labels != IGNORE
        changed = (labelled & (labels != p_st.argmax(1))).sum() / labelled.sum()
        torch.testing.assert_close(out.diagnostics["changed_share"].double(), changed.double())
        torch.testing.assert_close(out.diagnostics["bank_fill"], torch.tensor(len(module.bank) / 12))
        cosines = torch.einsum("ndhw,cd->nchw", zn, F.normalize(teacher_w.double(), dim=1))
        ordered = cosines.sort(dim=1, descending=True).values
        margin = (ordered[:, 0] - ordered[:, 1])[valid].mean()
        torch.testing.assert_close(out.diagnostics["top2_margin"].double(), margin, rtol=1e-5, atol=1e-6)
        agreement = (p_sl.argmax(1) == p_st.argmax(1))[valid].double().mean()
        torch.testing.assert_close(out.diagnostics["sl_agreement"].double(), agreement)
        torch.testing.assert_close(out.sl_logits.double(), cosines / TAU, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            float(out.diagnostics["prior_entropy"]), -(prior * np.log(prior)).sum(), 1e-6
        )
        assert all(value.dim() == 0 for value in out.diagnostics.values())


def test_without_rectification_the_labels_are_argmax_p_st_and_the_rest_runs_alike():
    z, p_st, valid = make_batch(6)
    teacher_w, student_w = torch.randn(C, D), torch.randn(C, D)
    # A teacher whose P_SL disagrees with P_ST somewhere, so rectification changes labels.
    rectified = SelfLabeling(C, D, num_samples=M, bank_size=12)(
        z, p_st, teacher_w, student_w, valid_mask=valid, generator=torch.Generator().manual_seed(0)
    )
    argmax = torch.where(valid, p_st.argmax(1), IGNORE)
    assert not torch.equal(rectified.labels, argmax)
    plain = SelfLabeling(C, D, num_samples=M, bank_size=12, rectification=False)(
        z, p_st, teacher_w, student_w, valid_mask=valid, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(plain.labels, argmax, rtol=0, atol=0)
    assert float(plain.diagnostics["changed_share"]) == 0.0
    torch.testing.assert_close(plain.sl_probs, rectified.sl_probs)  # P_SL is still computed (diagnostics)
    # The threshold then applies to P_ST's own confidence.
    thresholded = SelfLabeling(C, D, num_samples=M, bank_size=12, rectification=False, rectify_threshold=0.7)(
        z, p_st, teacher_w, student_w, valid_mask=valid, generator=torch.Generator().manual_seed(0)
    )
    confident = valid & (p_st.max(1).values >= 0.7)
    torch.testing.assert_close(
        thresholded.labels, torch.where(confident, p_st.argmax(1), IGNORE), rtol=0, atol=0
    )


def test_without_a_bank_sinkhorn_sees_the_current_samples_only():
    module = SelfLabeling(C, D, num_samples=M, bank_size=0)
    assert module.bank is None and set(module.state_dict()) == {"prior.distribution"}
    z, p_st, valid = make_batch(8)
    student_w = torch.randn(C, D)
    for step in range(2):  # the second step must not see the first step's samples
        prior = module.prior.distribution.double().numpy().copy()  # moves after each step
        out = module(
            z,
            p_st,
            torch.randn(C, D),
            student_w,
            valid_mask=valid,
            generator=torch.Generator().manual_seed(step),
        )
        rows = F.normalize(z.double(), dim=1).permute(0, 2, 3, 1).reshape(2, -1, D)
        current = torch.stack(
            [rows[n, out.sample_indices[n, m]] for n in range(2) for m in range(M) if out.sample_valid[n, m]]
        )
        scores = current.numpy() @ F.normalize(student_w.double(), dim=1).numpy().T
        expected = float64_sinkhorn(scores, prior, 0.05, 3)
        np.testing.assert_allclose(out.q[out.sample_valid].double().numpy(), expected, rtol=2e-4, atol=1e-6)
        assert float(out.diagnostics["bank_fill"]) == 0.0


def test_gradients_reach_prototypes_and_optionally_student_embeddings():
    module = SelfLabeling(C, D, num_samples=M, bank_size=20)
    z, p_st, _ = make_batch(1)
    teacher_z = z.clone().requires_grad_(True)
    student_w = torch.nn.Parameter(torch.randn(C, D))
    module(teacher_z, p_st, torch.randn(C, D), student_w).loss.backward()
    assert student_w.grad is not None and student_w.grad.abs().sum() > 0
    assert teacher_z.grad is None  # the teacher is never back-propagated
    student_z = torch.randn_like(z, requires_grad=True)
    module(z, p_st, torch.randn(C, D), student_w, student_embeddings=student_z).loss.backward()
    assert student_z.grad is not None and student_z.grad.abs().sum() > 0


def test_state_dict_round_trip_continues_identically():
    def build():
        return SelfLabeling(C, D, num_samples=M, bank_size=8, prior_momentum=0.5, logits_branch=True)

    module = build()
    teacher_w, student_w = torch.randn(C, D), torch.randn(C, D)
    for step in range(2):
        z, p_st, _ = make_batch(step)
        module(z, p_st, teacher_w, student_w, teacher_logits=torch.randn_like(p_st))
    state = module.state_dict()
    assert set(state) == {
        "bank.embeddings",
        "bank.valid",
        "bank.pointer",
        "logits_bank.embeddings",
        "logits_bank.valid",
        "logits_bank.pointer",
        "prior.distribution",
    }
    restored = build()
    restored.load_state_dict(state)
    z, p_st, _ = make_batch(7)
    logits = torch.randn_like(p_st)
    a = module(
        z, p_st, teacher_w, student_w, teacher_logits=logits, generator=torch.Generator().manual_seed(3)
    )
    b = restored(
        z, p_st, teacher_w, student_w, teacher_logits=logits, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(a.q, b.q, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=0, atol=0)


def test_logits_branch_adds_a_second_sinkhorn_on_normalised_logits():
    module = SelfLabeling(C, D, num_samples=M, bank_size=30, logits_branch=True)
    plain = SelfLabeling(C, D, num_samples=M, bank_size=30)
    z, p_st, _ = make_batch(2)
    teacher_logits = torch.randn_like(p_st)
    teacher_w, student_w = torch.randn(C, D), torch.randn(C, D)
    out = module(
        z,
        p_st,
        teacher_w,
        student_w,
        teacher_logits=teacher_logits,
        generator=torch.Generator().manual_seed(0),
    )
    base = plain(z, p_st, teacher_w, student_w, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.q, base.q)
    samples = F.normalize(teacher_logits.double(), dim=1).flatten(2).transpose(1, 2)
    samples = torch.stack([samples[n, out.sample_indices[n]] for n in range(2)]).reshape(-1, C)
    expected_q = float64_sinkhorn(samples.numpy(), np.full(C, 0.25), 0.05, 3)
    np.testing.assert_allclose(out.q_logits.reshape(-1, C).double().numpy(), expected_q, rtol=2e-4, atol=1e-6)
    zs = F.normalize(z.double(), dim=1).flatten(2).transpose(1, 2)
    zs = torch.stack([zs[n, out.sample_indices[n]] for n in range(2)])
    logits = zs @ F.normalize(student_w.double(), dim=1).t() / 0.08
    extra = -(torch.from_numpy(expected_q).reshape(2, M, C) * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(out.loss.double(), base.loss.double() + extra, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(module.logits_bank.get().double(), samples, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="teacher_logits"):
        module(z, p_st, teacher_w, student_w)


def test_bf16_autocast_inputs_give_float32_targets():
    module = SelfLabeling(C, D, num_samples=M, bank_size=30)
    reference = SelfLabeling(C, D, num_samples=M, bank_size=30)
    z, p_st, _ = make_batch(3)
    z, p_st = z.bfloat16(), p_st.bfloat16()
    teacher_w, student_w = torch.randn(C, D), torch.randn(C, D, requires_grad=True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = module(z, p_st, teacher_w, student_w, generator=torch.Generator().manual_seed(0))
    expected = reference(
        z.float(), p_st.float(), teacher_w, student_w, generator=torch.Generator().manual_seed(0)
    )
    assert out.q.dtype == torch.float32 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.q, expected.q, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)


def test_step_never_synchronises_with_the_host():
    """Under FakeTensorMode any .item()/.cpu() value read, nonzero() or data-dependent shape raises."""
    module = SelfLabeling(C, D, num_samples=M, bank_size=16, logits_branch=True)
    student_w = torch.randn(C, D, requires_grad=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        z, p_st, valid = make_batch(4)
        out = module(
            z, p_st, torch.randn(C, D), student_w, teacher_logits=torch.randn_like(p_st), valid_mask=valid
        )
        out.loss.backward()
        assert out.q.shape == (2, M, C)
        # the guard is real: a host read or a data-dependent shape fails here
        with pytest.raises(DataDependentOutputException):
            out.loss.item()
        with pytest.raises(DynamicOutputShapeException):
            out.q[out.q > 0.5]


def test_bad_inputs_raise_clear_errors():
    module = SelfLabeling(C, D, num_samples=M, bank_size=16)
    z, p_st, _ = make_batch(5)
    with pytest.raises(ValueError, match="p_st"):
        module(z, p_st[:, :, :2], torch.randn(C, D), torch.randn(C, D))
    with pytest.raises(ValueError, match="student_prototypes"):
        module(z, p_st, torch.randn(C, D), torch.randn(C + 1, D))
    with pytest.raises(ValueError, match="teacher_embeddings"):
        module(z[:, :3], p_st, torch.randn(C, D), torch.randn(C, D))
    with pytest.raises(ValueError, match="sampling"):
        SelfLabeling(C, D, sampling="random")
