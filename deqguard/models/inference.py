"""An eval-only copy of an MDEQ classifier that computes the same function with less work.

Serving never trains, so two things the training graph needs can be baked in once at load:

- every BatchNorm (stem, head) is folded into the convolution before it (eval-mode BatchNorm is
  a per-channel affine map, so conv -> BN is one conv with a bias): 10-13 fewer passes over the
  head's largest activations per forward;
- weight normalisation is replaced by the weight it computes, so f never recomputes it.

The copy refuses ``train()``: its BatchNorm statistics are gone, and a training step on it
would silently train a different network. Outputs match the original to float rounding
(``tests/core/test_inference_model.py``).
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval

from deqguard.models.layers import Bottleneck
from deqguard.models.mdeq import MDEQClassifier

__all__ = ["is_inference_only", "prepare_for_inference"]

_FLAG = "_deqguard_inference_only"


def _fold_sequential(seq: nn.Sequential) -> nn.Sequential:
    """Conv2d followed by BatchNorm2d -> one Conv2d (other layers kept in order)."""
    mods = list(seq)
    out: list[nn.Module] = []
    i = 0
    while i < len(mods):
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(mods[i], nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
            out.append(fuse_conv_bn_eval(mods[i], nxt))
            i += 2
        else:
            out.append(mods[i])
            i += 1
    return nn.Sequential(*out)


def _fold_bottleneck(block: Bottleneck) -> None:
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
        setattr(block, conv, fuse_conv_bn_eval(getattr(block, conv), getattr(block, bn)))
        setattr(block, bn, nn.Identity())
    if isinstance(block.shortcut, nn.Sequential):
        block.shortcut = _fold_sequential(block.shortcut)


def _refuse_training(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError(
            "this model was prepared for inference (BatchNorm folded, weight norm baked in) "
            "and cannot be trained; load the checkpoint again to train"
        )
    return nn.Module.train(self, False)


def prepare_for_inference(model: MDEQClassifier) -> MDEQClassifier:
    """A folded, eval-only copy of ``model`` on the same device (the original is untouched)."""
    # A fresh module, not copy.deepcopy: a deep copy shares weight_norm's generated class with
    # the original, and removing the parametrization from the copy deletes it from both.
    folded = MDEQClassifier(model.config)
    folded.load_state_dict(model.state_dict())
    folded = folded.to(next(model.parameters()).device).eval()
    for module in list(folded.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    folded.stem = _fold_sequential(folded.stem)
    if isinstance(folded.stem_inject, nn.Sequential):
        folded.stem_inject = _fold_sequential(folded.stem_inject)
    for block in folded.head_incre:
        _fold_bottleneck(block)
    folded.head_down = nn.ModuleList(_fold_sequential(s) for s in folded.head_down)
    folded.head_final = _fold_sequential(folded.head_final)
    leftover = [n for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if leftover:  # a new layer pattern this function does not know: fail loudly, not slowly
        raise RuntimeError(f"BatchNorm layers left unfolded: {leftover}")
    for param in folded.parameters():
        param.requires_grad_(False)
    setattr(folded, _FLAG, True)
    folded.train = _refuse_training.__get__(folded)  # type: ignore[method-assign]
    return folded


def is_inference_only(model: nn.Module) -> bool:
    """True for a model returned by :func:`prepare_for_inference`."""
    return bool(getattr(model, _FLAG, False))
