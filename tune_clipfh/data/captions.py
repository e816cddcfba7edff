"""Captions of synthetic hand images, made from what the generator drew (`HandAttributes`).

They stand in for the web captions CLIP was pretrained on, so that the tiny text tower learns
words too (:mod:`tune_clipfh.model.pretrain`). Design:

* Captions name coarse, visible attributes: skin tone, the view (back or palm, left or right),
  the ring (colour and finger), the nails, the number of moles; on request also what changes
  from image to image (a bracelet, the tilt). Hand geometry and where the moles are are left
  to fine-tuning, which learns them from identity labels.
* The default fields are the identity-level ones (a hand keeps its moles on each aspect): a
  caption then says what stays the same across a person's images, so image features learn to
  ignore the tilt and the bracelet as re-identification needs. Measured on the tiny RN50
  (zero-shot test Rank-1 over the embedded default's 80 test identities, 400 pretraining
  steps, seed 0, unpinned builds, see :mod:`tune_clipfh.model.pretrain`): 14.6 % without the
  mole count, 18.9 % with it (188 and 468 distinct captions); earlier, on 40 test identities,
  adding bracelet and tilt took 24.7 % to 22.1 %.
* One fixed template per field, joined in `CAPTION_FIELDS` order: short enough for the tiny
  text context of 32 tokens (the longest caption is checked in the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..names import CAPTION_FIELDS, DEFAULT_CAPTION_FIELDS
from .synth import HandAttributes

TILT_DEGREES = 5.0
"""A rotation beyond this many degrees is written as a tilt; within it, as level."""
_COUNTS = ("no", "one", "two", "three", "four", "five", "six")


def caption(drawn: HandAttributes, fields: Sequence[str] = DEFAULT_CAPTION_FIELDS) -> str:
    """One short English caption of an image, e.g. ``the back of a fair right hand, a gold ring
    on the index finger, red nails, two moles`` (``, a bracelet, tilted up`` with those
    fields)."""
    unknown = [f for f in fields if f not in CAPTION_FIELDS]
    if unknown:
        raise ValueError(f"caption fields {unknown} are not valid "
                         f"(valid: {', '.join(CAPTION_FIELDS)})")
    side, hand = drawn.aspect.split()  # "dorsal right" -> dorsal, right
    subject = " ".join(p for p in (drawn.tone if "tone" in fields else "",
                                   hand if "view" in fields else "", "hand") if p)
    if "view" in fields:
        subject = f"the {'back' if side == 'dorsal' else 'palm'} of a {subject}"
    else:
        subject = f"a {subject}"
    parts = [subject]
    if "ring" in fields:
        parts.append(f"a {drawn.ring_colour} ring on the {drawn.ring_finger} finger")
    if "nails" in fields and side == "dorsal":  # nails show on the back of the hand only
        parts.append("red nails" if drawn.nail_polish else "bare nails")
    if "bracelet" in fields and drawn.accessories:
        parts.append("a bracelet")
    if "tilt" in fields:
        parts.append(_tilt(drawn.rotation))
    if "marks" in fields:
        count = min(drawn.moles, len(_COUNTS) - 1)
        parts.append(f"{_COUNTS[count]} mole{'' if count == 1 else 's'}")
    return ", ".join(parts)


def _tilt(rotation: float) -> str:
    # Fingers point right on the canvas; a positive (clockwise) rotation points them down.
    if rotation > TILT_DEGREES:
        return "tilted down"
    if rotation < -TILT_DEGREES:
        return "tilted up"
    return "level"
