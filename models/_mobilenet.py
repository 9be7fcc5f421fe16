"""What S-MobileNet v1 and v2 share: a stride-2 stem, then stages of blocks (each stage's
first block strided) whose last block at each output stride feeds ``forward_features``, and
the head (global average pooling, then the classifier, on the stride-32 map).
"""

from __future__ import annotations

from typing import Callable, ClassVar, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from slimops.models._features import FeatureTap
from slimops.models._original import convert_by_prefix
from slimops.nn import EvalChain, SlimConvBNAct, block_chains, chains_can_run, run_eval_chains
from slimops.width import ChannelRule

# One stage: its output channels, its number of blocks, its first block's stride, and a
# block builder ``(in channels, out channels, stride) -> block``.
Stage = Tuple[ChannelRule, int, int, Callable[[ChannelRule, ChannelRule, int], nn.Module]]

STEM_STRIDE = 2
# The stem as the first EvalChain of the body's (MobileNetBody._chained_body).
_STEM_CHAIN = EvalChain([("stem", 0, None)])


class MobileNetBody:
    """Mixin of the MobileNets (before ``nn.Module`` in the bases). Their ``__init__`` sets
    ``widths``, builds ``stem`` and ``blocks`` with ``_build_body``, taps blocks with
    ``_tap_blocks`` and sets ``pool`` and ``classifier``; their ``forward_features``
    returns a ``"stride32"`` map."""

    stem: nn.Module
    blocks: nn.Sequential
    _taps: Dict[int, str]
    pool: nn.Module
    classifier: nn.Module
    # What runs between the last block and the stride-32 map (None: nothing), for
    # _chained_body.
    _tail_chain: ClassVar[Optional[EvalChain]] = None

    def forward_features(self, x: Tensor) -> Dict[str, Tensor]:
        raise NotImplementedError

    def _build_body(self, stem_channels: ChannelRule, stages: Sequence[Stage],
                    tap_strides: Collection[int]) -> Tuple[Dict[int, int], ChannelRule]:
        """Set ``stem`` (3x3 stride-2 conv + S-BN + ReLU6 from the 3-channel image, at
        every width) and ``blocks`` (``stages``' blocks). Returns ``{total stride: index of
        its last block}`` for the strides in ``tap_strides``, and the last block's output
        channels."""
        widths: Sequence[float] = self.widths  # type: ignore[attr-defined]
        self.stem = SlimConvBNAct(3, stem_channels, 3, STEM_STRIDE, activation="relu6",
                                  widths=widths)
        blocks: List[nn.Module] = []
        last: Dict[int, int] = {}
        cin, stride = stem_channels, STEM_STRIDE
        for cout, repeats, first_stride, make_block in stages:
            for i in range(repeats):
                s = first_stride if i == 0 else 1
                blocks.append(make_block(cin, cout, s))
                stride *= s
                cin = cout
                if stride in tap_strides:
                    last[stride] = len(blocks) - 1
        self.blocks = nn.Sequential(*blocks)
        return last, cin

    def _tap_blocks(self, last: Dict[int, int], part: str) -> Tuple[FeatureTap, ...]:
        """Tap the blocks of ``last`` (``stack_stages``'s) for ``_block_features`` and
        return their ``FeatureTap``s, ascending stride: the map ``"stride<s>"`` is block
        ``i``'s output, whose channels are those of its conv ``part``."""
        self._taps = {i: f"stride{s}" for s, i in last.items()}
        return tuple(FeatureTap(f"stride{s}", s, f"blocks.{i}", f"blocks.{i}.{part}")
                     for s, i in sorted(last.items()))

    def _block_features(self, x: Tensor) -> Tuple[Dict[str, Tensor], Tensor]:
        """The stem and the blocks on ``x``: the tapped blocks' outputs by name, and the
        last block's output."""
        feats: Dict[str, Tensor] = {}
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self._taps:
                feats[self._taps[i]] = x
        return feats, x

    def _convert_original(self, sd: Mapping[str, Tensor],
                          prefixes: Mapping[str, str]) -> Dict[str, Tensor]:
        """``sd``, the original implementation's state_dict, on our keys
        (``convert_by_prefix``): its stem (``features.0`` = conv, S-BN, ReLU6) and its
        classifier (``classifier.0``) are named alike in v1 and v2; ``prefixes`` maps our
        other module paths to the original's."""
        return convert_by_prefix(self, sd, {  # type: ignore[arg-type]
            "stem.conv": "features.0.0", "stem.bn": "features.0.1",
            "classifier": "classifier.0", **prefixes})

    def _chained_body(self, x: Tensor) -> Optional[Tensor]:
        """The stem, the blocks and the tail on ``x`` as one compiled call in inference (their
        ``EvalChain``s one after another): the stride-32 map, or None where the modules must
        run (``slimops.nn.run_eval_chains``; a block with a hook of its own, or replaced, is
        called as a module)."""
        if not chains_can_run():
            return None
        blocks = block_chains(self.blocks)  # iterated, never called (as _block_features does)
        if blocks is None:
            return None
        tail = [] if self._tail_chain is None else [(self, self._tail_chain)]
        return run_eval_chains([(self, _STEM_CHAIN), *blocks, *tail], x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[N, num_classes]`` at the active width."""
        last = self._chained_body(x)
        if last is None:
            last = self.forward_features(x)["stride32"]
        return self.classifier(torch.flatten(self.pool(last), 1))
