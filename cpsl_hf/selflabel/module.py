"""``SelfLabeling``: one call per training step that runs CPSL's online pixel-level self-labeling.

Per step (SPEC "Online pixel-level self-labeling"), with N target images and maps of h x w at decode resolution:

1. ``P_SL = softmax(cos(z', W') / tau)`` from the teacher's embeddings ``z'`` and prototypes ``W'``; rectified
   labels ``argmax_c P_SL P_ST``.
2. M pixels per image (class-balanced by default), their L2-normalised teacher embeddings.
3. Under data parallelism: all processes' samples are gathered (one ``all_gather``).
4. Sinkhorn on ``[bank; all current samples]`` against ``normalize(W)`` with the class prior; a process keeps the
   rows of its own samples. A partially filled bank takes part with zero-mass rows (exactly as if only its
   filled rows were there), so shapes never depend on data.
5. ``L_SL`` with the student's cosine scores ``cos(z, W) / tau`` of the sampled pixels (``z`` the teacher's
   embeddings, detached, unless the student's are given, as the option that lets the loss reach them).
6. All gathered samples enter the bank; the prior moves towards the global histogram of rectified labels
   (one ``all_reduce``, shared with the diagnostics). Non-finite samples update neither; a trainer that only
   learns after the backward that the step was non-finite undoes both (:meth:`SelfLabeling.settle_updates`).

Nothing in the step moves data to the CPU or creates a data-dependent shape, so on a GPU it never waits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_gather_rows, all_reduce_sum, process_rank_and_count
from .losses import self_labeling_loss
from .memory import MemoryBank
from .prior import ClassPrior, class_argmax, class_histogram, rectify
from .sampling import class_balanced_sample, uniform_sample
from .sinkhorn import sinkhorn

__all__ = ["SelfLabeling", "SelfLabelingOutput", "cosine_logits"]

SAMPLING_METHODS = ("class_balanced", "uniform")


@dataclass
class SelfLabelingOutput:
    """Result of one :class:`SelfLabeling` step.

    Attributes:
        labels: N x h x w int64 rectified pseudo labels (``ignore_index`` where ignored).
        loss: 0-dim ``L_SL`` (plus the logits branch's term when enabled); carries the gradient to ``W``
            (and to the student's embeddings when they were given).
        q: N x M x C Sinkhorn targets of this process' sampled pixels (rows of invalid samples are 0).
        diagnostics: 0-dim tensors, over all processes: ``changed_share`` (share of labelled pixels whose
            rectified label differs from argmax P_ST), ``sl_agreement`` (share of valid pixels where argmax P_SL
            equals argmax P_ST), ``top2_margin`` (mean over valid pixels of the gap between the two highest
            cosines of the teacher embedding to ``W'``), ``prior_entropy`` (after the update, nats),
            ``bank_fill`` (share of valid bank slots, after the enqueue).
        sample_indices: N x M flat pixel indices into h * w of the sampled pixels.
        sample_valid: N x M bool, false for padding slots of images with fewer than M labelled pixels.
        sl_probs: N x C x h x w teacher ``P_SL`` (float32).
        q_logits: N x M x C targets of the optional logits branch, else None.
        sl_logits: N x C x h x w teacher scores ``cos(z', W') / tau`` (float32; ``P_SL`` is their softmax).
    """

    labels: torch.Tensor
    loss: torch.Tensor
    q: torch.Tensor
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_indices: torch.Tensor | None = None
    sample_valid: torch.Tensor | None = None
    sl_probs: torch.Tensor | None = None
    q_logits: torch.Tensor | None = None
    sl_logits: torch.Tensor | None = None


def cosine_logits(embeddings: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """``cos(z, w_c) / tau`` for every pixel and class, in float32 whatever the autocast mode.

    Args:
        embeddings: N x D x h x w pixel embeddings (gradients flow into them).
        prototypes: C x D class prototypes (gradients flow into them unless detached).
        temperature: tau.

    Returns:
        N x C x h x w float32 scores.
    """
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        directions = F.normalize(embeddings.float(), dim=1)
        unit_prototypes = F.normalize(prototypes.float(), dim=1)
        return torch.einsum("ndhw,cd->nchw", directions, unit_prototypes) / temperature


def _gather_pixels(maps: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """N x K x h x w maps, N x M flat indices -> N x M x K (differentiable)."""
    num_images, channels = maps.shape[:2]
    flat = maps.reshape(num_images, channels, -1)
    index = indices[:, None, :].expand(num_images, channels, indices.shape[1])
    return flat.gather(2, index).transpose(1, 2)


class SelfLabeling(nn.Module):
    """CPSL's self-labeling step with its state (memory bank, class prior) as buffers.

    Args:
        num_classes: C.
        embedding_dim: D of the pixel embeddings.
        num_samples: M pixels sampled per image (256).
        bank_size: memory bank rows (65,536); 0 runs without a bank (Sinkhorn on the current samples only).
        temperature: tau of the cosine classifier (0.08).
        epsilon: Sinkhorn entropic regulariser (0.05).
        sinkhorn_iterations: 3.
        prior_momentum: alpha of the prior EMA (0.999).
        static_prior: keep the prior fixed (reference code).
        sampling: ``"class_balanced"`` (paper Eq. 9) or ``"uniform"`` (reference code).
        rectify_threshold: confidence threshold of :func:`rectify` (0 keeps all pixels).
        rectification: rectify the pseudo labels with ``P_SL`` (default); False gives ``argmax P_ST`` (with the
            same threshold on ``P_ST``) while everything else runs as usual (an ablation).
        logits_branch: also run the reference's second Sinkhorn on the teacher's L2-normalised logits (needs
            ``teacher_logits``), with a bank of its own, and add its loss.
        ignore_index: label of ignored pixels (255).
        sinkhorn_dtype: ``torch.float32`` or ``torch.float64`` for the Sinkhorn.
        initial_prior: optional length-C class histogram for the prior (uniform otherwise; see
            :meth:`initialize_prior`).
        process_group: ``torch.distributed`` group (default: the world when initialised).

    State (``state_dict()``): ``bank.*`` (unless ``bank_size`` is 0), ``prior.distribution`` and, with the logits
    branch, ``logits_bank.*``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        num_samples: int = 256,
        bank_size: int = 65536,
        temperature: float = 0.08,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        prior_momentum: float = 0.999,
        static_prior: bool = False,
        sampling: str = "class_balanced",
        rectify_threshold: float = 0.0,
        rectification: bool = True,
        logits_branch: bool = False,
        ignore_index: int = 255,
        sinkhorn_dtype: torch.dtype = torch.float32,
        initial_prior: torch.Tensor | None = None,
        process_group=None,
    ):
        super().__init__()
        if sampling not in SAMPLING_METHODS:
            raise ValueError(f"SelfLabeling: sampling must be one of {SAMPLING_METHODS}, got {sampling!r}")
        if sinkhorn_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"SelfLabeling: sinkhorn_dtype must be float32 or float64, got {sinkhorn_dtype}")
        if temperature <= 0:
            raise ValueError(f"SelfLabeling: temperature must be positive, got {temperature}")
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.num_samples = int(num_samples)
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.sampling = sampling
        self.rectify_threshold = float(rectify_threshold)
        self.rectification = bool(rectification)
        if bank_size < 0:
            raise ValueError(f"SelfLabeling: bank_size must be >= 0, got {bank_size}")
        self.logits_branch = bool(logits_branch)
        self.ignore_index = int(ignore_index)
        self.sinkhorn_dtype = sinkhorn_dtype
        self.process_group = process_group
        self.bank = MemoryBank(bank_size, self.embedding_dim) if bank_size > 0 else None
        self.logits_bank = (
            MemoryBank(bank_size, self.num_classes) if self.logits_branch and bank_size > 0 else None
        )
        initial = torch.ones(self.num_classes) if initial_prior is None else initial_prior
        self.prior = ClassPrior(initial, momentum=prior_momentum, static=static_prior)
        self.record_updates = False  # see settle_updates
        self._pending_updates: list = []

    @torch.no_grad()
    def settle_updates(self, keep: torch.Tensor) -> None:
        """Keep (``keep`` true) or undo (false) the bank and prior updates of the forwards since the last call;
        ``keep`` is a 0-dim bool tensor, e.g. "the training step was finite", so nothing waits for the device.
        Only with ``record_updates = True`` (a trainer that learns after the forward whether the step counts);
        otherwise every forward's update is final and this does nothing."""
        for undo, previous_prior in reversed(self._pending_updates):
            for bank, record in reversed(undo):
                bank.revert_(record, keep)
            distribution = self.prior.distribution
            distribution.copy_(torch.where(keep.to(distribution.device), distribution, previous_prior))
        self._pending_updates.clear()

    def initialize_prior(self, class_histogram: torch.Tensor) -> None:
        """Set the prior to a class histogram (e.g. counts of argmax P_ST over the target set, all-reduced)."""
        self.prior.initialize_(class_histogram)

    def reset_bank(self) -> None:
        if self.bank is not None:
            self.bank.reset()
        if self.logits_bank is not None:
            self.logits_bank.reset()

    def pseudo_labels(
        self, sl_probs: torch.Tensor, p_st: torch.Tensor, valid_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The configured pseudo labels of N x C x h x w ``P_SL`` and ``P_ST`` (any resolution, e.g. both
        upsampled to the label size): ``argmax P_SL P_ST`` (rectification), or ``argmax P_ST`` without it, with
        the confidence threshold; ``ignore_index`` outside ``valid_mask``. N x h x w int64."""
        return rectify(
            sl_probs if self.rectification else torch.ones_like(sl_probs),
            p_st,
            self.rectify_threshold,
            ignore_index=self.ignore_index,
            valid_mask=valid_mask,
        )

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None):
        """(indices, valid), N x M each, with the configured sampler."""
        if self.sampling == "uniform":
            return uniform_sample(
                labels, self.num_samples, ignore_index=self.ignore_index, generator=generator
            )
        return class_balanced_sample(
            labels, self.num_samples, self.ignore_index, generator=generator, num_classes=self.num_classes
        )

    def _check_inputs(
        self, teacher_embeddings, p_st, teacher_prototypes, student_prototypes, student_embeddings
    ):
        if teacher_embeddings.dim() != 4 or teacher_embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"SelfLabeling: teacher_embeddings must be N x {self.embedding_dim} x h x w, "
                f"got {tuple(teacher_embeddings.shape)}"
            )
        num_images, _, height, width = teacher_embeddings.shape
        expected = (num_images, self.num_classes, height, width)
        if tuple(p_st.shape) != expected:
            raise ValueError(
                f"SelfLabeling: p_st must be N x C x h x w = {expected} (the embeddings' resolution), "
                f"got {tuple(p_st.shape)}"
            )
        for name, prototypes in (
            ("teacher_prototypes", teacher_prototypes),
            ("student_prototypes", student_prototypes),
        ):
            if tuple(prototypes.shape) != (self.num_classes, self.embedding_dim):
                raise ValueError(
                    f"SelfLabeling: {name} must be C x D = {(self.num_classes, self.embedding_dim)}, "
                    f"got {tuple(prototypes.shape)}"
                )
        if student_embeddings is not None and student_embeddings.shape != teacher_embeddings.shape:
            raise ValueError(
                f"SelfLabeling: student_embeddings must match teacher_embeddings {tuple(teacher_embeddings.shape)}, "
                f"got {tuple(student_embeddings.shape)}"
            )

    def forward(
        self,
        teacher_embeddings: torch.Tensor,
        p_st: torch.Tensor,
        teacher_prototypes: torch.Tensor,
        student_prototypes: torch.Tensor,
        student_embeddings: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        valid_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SelfLabelingOutput:
        """One self-labeling step on a target batch.

        Args:
            teacher_embeddings: N x D x h x w EMA-teacher pixel embeddings (no gradient needed).
            p_st: N x C x h x w soft pseudo label at the same resolution.
            teacher_prototypes: C x D ``W'`` (EMA prototypes), for ``P_SL`` and the rectification.
            student_prototypes: C x D ``W``, the parameter ``L_SL`` trains.
            student_embeddings: optional N x D x h x w student embeddings of the same pixels; when given,
                ``L_SL`` is computed from them (and reaches the student network). Default: the teacher's,
                detached, so ``L_SL`` trains only ``W`` (reference).
            teacher_logits: N x C x h x w teacher logits, required when ``logits_branch``.
            valid_mask: optional N x h x w bool; false pixels are ignored (e.g. outside a warped view).
            generator: optional ``torch.Generator`` for the sampling.

        Returns:
            :class:`SelfLabelingOutput`. Updates the bank and (unless static) the prior in place.
        """
        self._check_inputs(
            teacher_embeddings, p_st, teacher_prototypes, student_prototypes, student_embeddings
        )
        if self.logits_branch and (teacher_logits is None or teacher_logits.shape != p_st.shape):
            raise ValueError("SelfLabeling: logits_branch=True needs teacher_logits of shape N x C x h x w")
        num_images = teacher_embeddings.shape[0]
        rank, _ = process_rank_and_count(self.process_group)
        device = teacher_embeddings.device

        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            # 1. P_SL from the teacher and the rectified labels. cos = (z . w) / |z|: the embeddings are never
            #    normalised as a whole (that would copy N x D x h x w), only the sampled rows are.
            teacher_z = teacher_embeddings.detach().float()
            num_images, _, height, width = teacher_z.shape
            flat_z = teacher_z.reshape(num_images, self.embedding_dim, height * width)
            teacher_w = F.normalize(teacher_prototypes.detach().float(), dim=1)
            inverse_norm = (
                torch.linalg.vector_norm(flat_z, dim=1, keepdim=True).clamp_min_(1e-12).reciprocal_()
            )
            cosines = torch.matmul(teacher_w, flat_z)  # N x C x h*w, z never copied
            cosines.mul_(inverse_norm)
            top2 = cosines.topk(min(2, self.num_classes), dim=1).values  # N x 2 x h*w
            margin = (top2[:, 0] - top2[:, -1]).reshape(num_images, height, width)
            sl_logits_teacher = cosines.div_(self.temperature).reshape(
                num_images, self.num_classes, height, width
            )
            sl_probs = torch.softmax(sl_logits_teacher, dim=1)
            p_st = p_st.detach().float()
            labels = self.pseudo_labels(sl_probs, p_st, valid_mask)
            labelled = labels != self.ignore_index
            p_st_argmax = class_argmax(p_st)
            changed = labelled & (labels != p_st_argmax)
            valid = torch.ones_like(labelled) if valid_mask is None else valid_mask.bool()
            agree = valid & (class_argmax(sl_probs) == p_st_argmax)

            # 2. Sample M pixels per image; their L2-normalised teacher embeddings.
            indices, sample_valid = self.sample(labels, generator=generator)
            samples = F.normalize(_gather_pixels(teacher_z, indices), dim=2).reshape(-1, self.embedding_dim)
            packed = [samples, sample_valid.reshape(-1, 1).float()]
            if self.logits_branch:
                logit_samples = F.normalize(_gather_pixels(teacher_logits.detach().float(), indices), dim=2)
                packed.append(logit_samples.reshape(-1, self.num_classes))

            # 3. One all_gather for everything sampled, one all_reduce for the histogram and the diagnostics.
            gathered = all_gather_rows(torch.cat(packed, dim=1), self.process_group)
            all_samples = gathered[:, : self.embedding_dim]
            all_valid = gathered[:, self.embedding_dim] > 0.5
            statistics = torch.cat(
                [
                    class_histogram(labels, self.num_classes, self.ignore_index),
                    changed.sum().float().reshape(1),
                    labelled.sum().float().reshape(1),
                    agree.sum().float().reshape(1),
                    (margin * valid).sum().reshape(1),
                    valid.sum().float().reshape(1),
                ]
            )
            statistics = all_reduce_sum(statistics, self.process_group)

            # 4. Sinkhorn on [bank; all current samples]; this process keeps its own rows.
            student_w = F.normalize(student_prototypes.detach().float(), dim=1)
            bank_rows = 0 if self.bank is None else self.bank.size
            own_rows = slice(
                bank_rows + rank * num_images * self.num_samples,
                bank_rows + (rank + 1) * num_images * self.num_samples,
            )
            q = self._assign(self.bank, all_samples, all_valid, student_w.t())[own_rows]
            q = q.float().reshape(num_images, self.num_samples, self.num_classes)
            q_logits = None
            if self.logits_branch:
                all_logits = gathered[:, self.embedding_dim + 1 :]
                q_logits = self._assign(self.logits_bank, all_logits, all_valid, None)[own_rows]
                q_logits = q_logits.float().reshape(num_images, self.num_samples, self.num_classes)

        # 5. L_SL with the student's cosine scores (gradient to W, and to the student's embeddings if given).
        with torch.autocast(device_type=device.type, enabled=False):
            if student_embeddings is None:
                student_z = samples.reshape(num_images, self.num_samples, self.embedding_dim)
            else:
                student_z = F.normalize(_gather_pixels(student_embeddings.float(), indices), dim=2)
            w = F.normalize(student_prototypes.float(), dim=1)
            sl_logits = student_z @ w.t() / self.temperature  # N x M x C
            loss = self_labeling_loss(q, sl_logits, sample_valid)
            if q_logits is not None:
                loss = loss + self_labeling_loss(q_logits, sl_logits, sample_valid)

        # 6. State updates: every process enqueues the same gathered rows; prior from the global histogram.
        #    Rows with a NaN or Inf (a diverging teacher) update nothing, decided on the device.
        with torch.no_grad():
            finite = torch.isfinite(gathered).all()  # identical on every process (gathered rows)
            undo = []
            if self.bank is not None:
                undo.append((self.bank, self.bank.enqueue(all_samples, all_valid, commit=finite)))
            if self.logits_bank is not None:
                undo.append(
                    (self.logits_bank, self.logits_bank.enqueue(all_logits, all_valid, commit=finite))
                )
            previous_prior = self.prior.distribution.clone() if self.record_updates else None
            self.prior.update(statistics[: self.num_classes], commit=finite)
            if self.record_updates:
                self._pending_updates.append((undo, previous_prior))
            changed_count, labelled_count, agree_count, margin_sum, valid_count = statistics[
                self.num_classes :
            ].unbind()
            diagnostics = {
                "changed_share": changed_count / labelled_count.clamp_min(1.0),
                "sl_agreement": agree_count / valid_count.clamp_min(1.0),
                "top2_margin": margin_sum / valid_count.clamp_min(1.0),
                "prior_entropy": self.prior.entropy(),
                "bank_fill": self.bank.fill_fraction() if self.bank is not None else statistics.new_zeros(()),
            }
        return SelfLabelingOutput(
            labels=labels,
            loss=loss,
            q=q,
            diagnostics=diagnostics,
            sample_indices=indices,
            sample_valid=sample_valid,
            sl_probs=sl_probs,
            q_logits=q_logits,
            sl_logits=sl_logits_teacher,
        )

    def _assign(
        self, bank: MemoryBank | None, current: torch.Tensor, current_valid: torch.Tensor, projection
    ):
        """Sinkhorn plan for ``[bank; current]`` (``current`` alone without a bank); scores are
        ``rows @ projection`` (or the rows themselves). The bank is scored in place (no ``size x D``
        concatenation), only the B x C scores are concatenated."""
        scores, weights = [current], [current_valid]
        if bank is not None:
            scores.insert(0, bank.embeddings.float())
            weights.insert(0, bank.valid)
        if projection is not None:
            scores = [rows @ projection for rows in scores]
        return sinkhorn(
            torch.cat(scores, dim=0).to(self.sinkhorn_dtype),
            self.prior.distribution,
            epsilon=self.epsilon,
            iterations=self.sinkhorn_iterations,
            weights=torch.cat(weights),
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, num_samples={self.num_samples}, "
            f"temperature={self.temperature}, epsilon={self.epsilon}, iterations={self.sinkhorn_iterations}, "
            f"sampling={self.sampling!r}, logits_branch={self.logits_branch}"
        )
