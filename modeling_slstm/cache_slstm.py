"""The recurrent state of an sLSTM LM as a transformers `Cache`, passed around as `cache` (`past_key_values` before
transformers 5.24).

Per block: the causal-conv window (the last K-1 normed layer inputs, oldest first) and the cell state (h, c, n, m).
Its size is fixed: one token or a million, the cache holds the same tensors.

Rollback, for speculative decoding (transformers' protocol): after `activate_past_recording()` every forward keeps the
state it started from (a few KiB per block) and a way to recompute the state after any prefix of its tokens; `crop`
then undoes the last tokens exactly, and a crop of nothing drops what was kept. Without recording nothing is kept and
nothing can be undone.
"""

from typing import Callable, NamedTuple, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .transformers_compat import CROP_TAKES_TOKENS_TO_REMOVE


# replay(p, conv window, cell state before) -> (conv window, cell state) after the first p tokens of a recorded forward
Replay = Callable[[int, Optional[torch.Tensor], Optional[tuple]], tuple]


class RecordedSteps:
    """The replay of a forward that kept its state after each token (the one-call decoding kernel does): step_windows
    (S, B, K-1, D) or None, step_states (S, 4, B, NH, DH) -> (window, state) after its first p tokens. Tensors only,
    so it pickles with the cache (a replay that recomputes from the model's modules does not: see `__getstate__`)."""

    def __init__(self, step_windows: Optional[torch.Tensor], step_states: torch.Tensor):
        self.step_windows, self.step_states = step_windows, step_states

    def __call__(self, p: int, window: Optional[torch.Tensor], state: Optional[tuple]) -> tuple:
        return (None if self.step_windows is None else self.step_windows[p - 1]), tuple(self.step_states[p - 1].unbind(0))


class _Record(NamedTuple):
    """One recorded forward: the state before it, how many tokens it took, and its replay (None: undo it whole)."""

    conv_window: Optional[torch.Tensor]
    cell_state: Optional[tuple]
    seen_tokens: int
    num_tokens: int
    replay: Optional[Replay]


class SLSTMCacheLayer(CacheLayerMixin):
    """One block's state. Empty until the first forward fills it (batch size and device come from the inputs)."""

    is_compileable = False
    is_croppable = True  # once recording: see `crop`
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.conv_window: Optional[torch.Tensor] = None  # (B, K-1, D) in the activation dtype, None if K <= 1
        self.cell_state: Optional[tuple[torch.Tensor, ...]] = None  # (h, c, n, m), each (B, NH, DH) float32
        self.seen_tokens = 0  # every token consumed, pads included
        self.record_past = False  # keep what `crop` needs to undo the forwards since the last crop
        self._records: list[_Record] = []

    # --- what the sLSTM layer reads and writes -------------------------------------------------------------------
    def write(
        self, conv_window: Optional[torch.Tensor], cell_state: tuple, num_tokens: int, replay: Optional[Replay] = None
    ) -> None:
        """Store the state after `num_tokens` more tokens. While recording, the state before is kept (copied, so no
        later in-place update can reach it) with `replay`, which recomputes the state after a prefix of these tokens."""
        if self.record_past:
            before = None if self.cell_state is None else tuple(t.clone() for t in self.cell_state)
            window = None if self.conv_window is None else self.conv_window.clone()
            self._records.append(_Record(window, before, self.seen_tokens, num_tokens, replay))
        elif self._records:
            self._records.clear()
        self.conv_window = conv_window
        self.cell_state = tuple(cell_state)
        self.seen_tokens += num_tokens
        self.is_initialized = True

    def check(self, x: torch.Tensor, hidden_size: int, num_heads: int, head_dim: int, window_len: int) -> None:
        """Before any use: a ValueError naming what does not fit the block about to read this state.

        x (B, S, D) is the block's input: it fixes the batch, the device and the dtypes (the window in x's dtype, the
        cell state float32, float64 for float64 inputs); the rest comes from the config: width, heads, head dim and
        window length K-1 (0 without a conv). An empty layer fits every block.
        """
        if self.cell_state is None:
            return
        batch_size = x.shape[0]
        state_dtype = torch.promote_types(x.dtype, torch.float32)

        def fail(what: str):
            raise ValueError(
                f"This SLSTMCache does not belong to this model (or batch): {what}. Pass the cache a previous call of "
                f"this model returned, or a fresh `SLSTMCache(model.config)`."
            )

        if len(self.cell_state) != 4:
            fail(f"the cell state has {len(self.cell_state)} tensors, expected (h, c, n, m)")
        device, state_shape = x.device, (batch_size, num_heads, head_dim)  # read once: this runs per block and token
        for name, t in zip("hcnm", self.cell_state):
            if t.shape != state_shape:
                fail(f"its state {name} has shape {tuple(t.shape)}, the model needs {state_shape} "
                     f"(batch, heads, head dim; width {hidden_size})")
            if t.dtype is not state_dtype or t.device != device:
                fail(f"its state {name} is {t.dtype} on {t.device}, the model needs {state_dtype} on {device}")
        window = self.conv_window
        if (window is None) != (window_len == 0):
            needs = f"a window of {window_len} past steps for its conv" if window_len else "none (no conv)"
            fail(f"it holds {'no' if window is None else 'a'} conv window, the model needs {needs}")
        if window is not None:
            if window.shape != (batch_size, window_len, hidden_size):
                fail(f"its conv window has shape {tuple(window.shape)}, the model needs "
                     f"{(batch_size, window_len, hidden_size)} (batch, conv kernel - 1, width)")
            if window.dtype is not x.dtype or window.device != device:
                fail(f"its conv window is {window.dtype} on {window.device}, the model needs {x.dtype} on {device}")

    def __getstate__(self) -> dict:
        """Pickled or deep-copied: the state, and what undoes whole recorded forwards and kernel-recorded steps. A
        replay that recomputes part of a forward with the model's modules stays behind (it would carry the model with
        it), so undoing part of such a forward in the copy is refused with a ValueError, never wrong."""
        kept = dict(self.__dict__)
        kept["_records"] = [r if r.replay is None or isinstance(r.replay, RecordedSteps) else r._replace(replay=None)
                            for r in self._records]
        return kept

    def _tensors(self) -> list[torch.Tensor]:
        tensors = list(self.cell_state) if self.cell_state is not None else []
        return tensors + ([self.conv_window] if self.conv_window is not None else [])

    def _map(self, fn) -> None:
        """Apply fn to every state tensor (a batch reorder or selection, a device move). What was kept for `crop`
        still has the old layout, so it is dropped: undoing past this point is then refused, never wrong."""
        self._records.clear()
        if self.cell_state is not None:
            self.cell_state = tuple(fn(t) for t in self.cell_state)
        if self.conv_window is not None:
            self.conv_window = fn(self.conv_window)

    @property
    def batch_size(self) -> int:
        return self.cell_state[0].shape[0] if self.cell_state is not None else -1

    @property
    def device(self) -> Optional[torch.device]:
        return self.cell_state[0].device if self.cell_state is not None else None

    def nbytes(self) -> int:
        """Bytes held by this block's state."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    # --- the CacheLayerMixin interface ---------------------------------------------------------------------------
    def lazy_initialization(self, *args, **kwargs) -> None:
        """Nothing to do: the sLSTM layer fills the state on its first forward."""

    def update(self, *args, **kwargs):
        raise NotImplementedError(
            "SLSTMCacheLayer holds a recurrent state, not keys and values; the sLSTM layer writes it with `write`."
        )

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.seen_tokens

    def get_max_length(self, *args, **kwargs) -> int:
        return -1  # no maximum: the state has no sequence dimension

    get_max_cache_shape = get_max_length  # the transformers 4.57 name

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        # (kv_length, kv_offset) as an attention layer would see them: past tokens plus the new ones.
        query = args[0] if args else next(iter(kwargs.values()), 0)
        query_length = query if isinstance(query, int) else query.shape[0]
        return self.seen_tokens + query_length, 0

    def reset(self) -> None:
        self.conv_window = None
        self.cell_state = None
        self.seen_tokens = 0
        self.is_initialized = False
        self._records.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def offload(self) -> None:
        if self.cell_state is not None:
            self._home = self.device
            self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        home = getattr(self, "_home", None)
        if home is not None and self.device != home:
            self._map(lambda t: t.to(home, non_blocking=True))

    def activate_past_recording(self) -> None:
        """Keep, from the next forward on, what `crop` needs to undo it."""
        self.record_past = True

    def stop_past_recording(self) -> None:
        """Keep nothing more, and drop what was kept."""
        self.record_past = False
        self._records.clear()

    def crop(self, length: int) -> None:
        """Undo the last tokens of the recorded forwards, exactly; then drop what was kept (recording stays on).

        transformers 5.x passes -k to remove k tokens (0: remove none); 4.57 the number of tokens to keep (negative:
        remove that many). What cannot be undone is a ValueError, raised before anything changes.
        """
        remove = self._removal(length)
        if remove > 0:
            self._undo(remove)
        self._records.clear()

    def _removal(self, length: int) -> int:
        """The number of tokens `crop(length)` removes, or the ValueError saying why they cannot be (nothing changes)."""
        if CROP_TAKES_TOKENS_TO_REMOVE and length > 0:
            raise ValueError(f"crop takes the number of tokens to remove as a negative int, got {length}.")
        remove = -length if length < 0 or CROP_TAKES_TOKENS_TO_REMOVE else self.seen_tokens - length
        recorded = sum(record.num_tokens for record in self._records)
        if remove > recorded:
            raise ValueError(
                f"Cannot undo {remove} tokens of the sLSTM state: it kept what is needed for {recorded} (the tokens fed "
                f"since `activate_past_recording()` or the last crop). A recurrent state cannot be rewound further; "
                f"run the prompt again instead."
            )
        left = remove
        for record in reversed(self._records):  # the last forwards first, as `_undo` takes them
            if left <= 0:
                break
            if left < record.num_tokens and record.replay is None:
                raise ValueError(f"This forward of {record.num_tokens} tokens can only be undone whole.")
            left -= record.num_tokens
        return remove

    def _undo(self, remove: int) -> None:
        """Undo the last `remove` tokens (`_removal` checked that they can be)."""
        while remove:
            record = self._records.pop()
            self.conv_window, self.cell_state, self.seen_tokens = record.conv_window, record.cell_state, record.seen_tokens
            keep = record.num_tokens - min(remove, record.num_tokens)
            remove -= record.num_tokens - keep
            if keep:  # part of this forward stays: recompute the state after its first `keep` tokens
                window, state = record.replay(keep, record.conv_window, record.cell_state)
                self.conv_window, self.cell_state = window, tuple(state)
                self.seen_tokens += keep
        self.is_initialized = self.cell_state is not None


class SLSTMCache(Cache):
    """The state of every block of an sLSTM LM; pass it back as `cache` to continue a sequence.

    `SLSTMCache(config)` makes an empty cache (e.g. for `generate(..., prefill_chunk_size=N, cache=cache)`);
    the model fills it on the first forward.
    """

    is_compileable = False

    def __init__(self, config, **kwargs):
        super().__init__(layers=[SLSTMCacheLayer() for _ in range(config.num_hidden_layers)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens consumed so far, pads included (generate relies on this to not feed the prompt twice)."""
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_max_length(self, *args, **kwargs) -> int:
        return -1

    def get_max_cache_shape(self, *args, **kwargs) -> int:
        return -1

    def get_mask_sizes(self, query, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query)

    def offload(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        """Move a block's state to the CPU (e.g. to free accelerator memory between uses)."""
        self.layers[layer_idx].offload()

    def prefetch(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        """Move an offloaded block's state back to the device it came from."""
        self.layers[layer_idx].prefetch()

    def activate_past_recording(self) -> None:
        """From the next forward on, keep what `crop` needs to undo it (speculative decoding's verification)."""
        for layer in self.layers:
            layer.activate_past_recording()

    def stop_past_recording(self) -> None:
        """Keep nothing more for `crop`, and drop what was kept."""
        for layer in self.layers:
            layer.stop_past_recording()

    def crop(self, length: int) -> None:
        """Undo the last recorded tokens exactly (`-k`, or on transformers 4.57 the length to keep); see the layer.
        All layers or none: a crop one of them cannot do is a ValueError before any changes."""
        for layer in self.layers:
            layer._removal(length)
        for layer in self.layers:
            layer.crop(length)

    @property
    def is_croppable(self) -> bool:
        return True

    def nbytes(self) -> int:
        """Bytes held by the whole state; it does not grow with the number of tokens seen."""
        return sum(layer.nbytes() for layer in self.layers)


__all__ = ["SLSTMCache", "SLSTMCacheLayer"]
