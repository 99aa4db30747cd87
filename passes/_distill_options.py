"""Option parsing for the distill pass, kept free of PyTorch so that importing the passes stays cheap."""

from __future__ import annotations

TERMS = ("kd", "feat", "nst", "rank")
AUGMENTATIONS = ("flip", "crop", "noise", "mixup")


def parse_terms(text: str) -> dict[str, float]:
    """'kd,nst:0.5,rank:0.1' -> {'kd': 1.0, 'nst': 0.5, 'rank': 0.1}."""
    terms = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, weight = part.partition(":")
        name = name.strip()
        if name not in TERMS:
            raise ValueError(f"loss terms are {', '.join(TERMS)} (each optionally :WEIGHT), not {name!r}")
        try:
            terms[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"loss weight {weight!r} of {name!r} is not a number") from None
        if not terms[name] >= 0.0:
            raise ValueError(f"loss weight of {name!r} must be >= 0")
    if not any(terms.values()):
        raise ValueError("loss needs at least one term with a positive weight (kd, feat, nst, rank)")
    return terms



def parse_augment(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip() and p.strip() != "none")
    unknown = sorted(set(names) - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(f"augment takes {', '.join(AUGMENTATIONS)} or none, not {', '.join(unknown)}")
    return names
