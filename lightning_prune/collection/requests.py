"""What a criterion asks the collector for: which tensor, which statistic, which pooling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["TOKEN_POOLINGS", "ActivationRequest", "Pooling", "Site", "Statistic", "TokenPooling", "check_token_pooling"]

Site = Literal["output", "input"]
Statistic = Literal["pooled", "covariance", "class_moments", "rows", "gram"]
Pooling = Literal["max", "avg"]
#: How a token sequence ``(batch, tokens, features)`` becomes one row per sample: the mean or the
#: maximum over the tokens, or the class token (the first one).
TokenPooling = Literal["avg", "max", "cls"]
TOKEN_POOLINGS: tuple[str, ...] = ("avg", "max", "cls")


def check_token_pooling(value: object, argument: str = "token_pooling", none: str = "") -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is None or one of :data:`TOKEN_POOLINGS`.

    ``none`` says in the message what None means (e.g. ``"every token is a row"``).
    """
    if value is not None and value not in TOKEN_POOLINGS:
        allowed = "'avg' (mean over the tokens), 'max' (maximum over the tokens), 'cls' (the class token, the first)"
        meaning = f" ({none})" if none else ""
        raise ValueError(f"{argument} must be {allowed} or None{meaning}, got {value!r}")


@dataclass(frozen=True)
class ActivationRequest:
    """One statistic of one module's activation.

    Attributes:
        module: qualified name of the module whose activation is observed.
        site: ``"output"`` (what the module produces) or ``"input"`` (what it consumes, e.g. the
            activation after BN, ReLU and pooling that the next layer reads).
        statistic: the name of an accumulator in
            :data:`~lightning_prune.collection.accumulators.ACCUMULATORS`; built in:
            ``"pooled"``: one value per sample and channel (global ``pooling`` over all
            non-channel dims), kept for a bounded reservoir of samples together with their labels;
            ``"covariance"``: streaming channel covariance over rows (every sample and spatial
            position is a row), O(C^2) memory whatever the number of samples;
            ``"class_moments"``: streaming class counts, class sums, feature sum and ``X^T X`` of
            the pooled values (needs labels), O(K C + C^2) memory whatever the number of samples;
            ``"rows"``: activation rows (sample x position, one column per channel), a uniform
            reservoir of at most ``max_rows`` of them (``rows_per_batch`` sampled per batch);
            ``"gram"``: the streamed Gram matrix ``Z^T Z`` of activation rows (with ``sum z`` and the
            row count), O(C^2) memory (``rows_per_batch`` sampled per batch).
        pooling: ``"max"`` or ``"avg"`` (for ``"pooled"`` and ``"class_moments"``).
        token_pooling: how a *token sequence* (a 3-D activation whose channels are the last dim:
            ``(batch, tokens, features)``, as the linear layers, norms and activations of a batch-first
            transformer see it) is reduced before the statistic: ``"avg"`` (mean over the tokens),
            ``"max"`` (maximum over the tokens) or ``"cls"`` (the class token: the first token), one row
            per sample for every statistic. None (default): the tokens are positions like those of a
            feature map: ``pooling`` over them for ``"pooled"`` and ``"class_moments"``, every token of
            every sample a row for ``"covariance"``, ``"rows"`` and ``"gram"``. Other activations (a
            convolution's ``(N, C, H, W)``, a 2-D ``(N, C)``) ignore it.
        rows_per_batch: for ``"covariance"``, ``"rows"`` and ``"gram"``: rows sampled uniformly per batch (bounds the cost of
            the per-batch product; all rows when the batch has fewer).
        channel_dim: the channel dimension of the activation; None (default) lets the collector
            decide: 1 for the output of a convolution, the last dimension otherwise.
        num_classes: for ``"class_moments"``: number of classes; 0 (default) takes the collector's.
        max_rows: for ``"rows"``: reservoir capacity.
        channels: when > 0, a 2-D activation of ``channels * r`` features (a flattened feature map,
            channel-major, as a linear layer after ``flatten`` reads it) is viewed as
            ``(N, channels, r)``: each channel's ``r`` positions become rows.
        channel_index: for ``"rows"`` and ``"gram"``: the entries along the channel dimension (the features of a
            2-D activation) that belong to the observed channels, channel-major (channel ``j`` owns
            entries ``j * r`` to ``(j + 1) * r - 1``), e.g. one branch's slice of a concatenation
            that the module reads; empty (default): every entry.
    """

    module: str
    site: Site = "output"
    statistic: Statistic = "pooled"
    pooling: Pooling = "max"
    rows_per_batch: int = 512
    channel_dim: int | None = None
    num_classes: int = 0
    max_rows: int = 4096
    channels: int = 0
    channel_index: tuple[int, ...] = ()
    token_pooling: TokenPooling | None = None

    def __post_init__(self) -> None:
        if self.site not in ("output", "input"):
            raise ValueError(f"site must be 'output' or 'input', got {self.site!r}")
        from lightning_prune.collection.accumulators import ACCUMULATORS

        if self.statistic not in ACCUMULATORS:
            names = [repr(name) for name in ACCUMULATORS]
            raise ValueError(f"statistic must be {', '.join(names[:-1])} or {names[-1]}, got {self.statistic!r}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        check_token_pooling(self.token_pooling)
        if self.rows_per_batch < 1:
            raise ValueError(f"rows_per_batch must be >= 1, got {self.rows_per_batch}")
        if self.channel_index and self.statistic not in ("rows", "gram"):
            raise ValueError(f"channel_index is only supported with statistic='rows' or 'gram', got {self.statistic!r}")
