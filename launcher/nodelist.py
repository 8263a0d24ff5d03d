"""Slurm's compressed host lists ('n[1-3,5],gpu01'), expanded the way `scontrol show hostnames` does. Pure."""
from __future__ import annotations

import re

from launcher.errors import UserError


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> names: 'n[1-3,5],gpu01' -> ['n1','n2','n3','n5','gpu01'] (zero padding kept)."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if not item:
            continue
        names = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            if not literal and not ranges:
                continue
            options = [literal]
            if ranges:
                options = [literal + value for value in _expand_ranges(ranges, nodelist)]
            names = [prefix + option for prefix in names for option in options]
        hosts.extend(names)
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise UserError(f"SLURM_JOB_NODELIST '{text}': unbalanced brackets")
    parts.append(current)
    return parts


def _expand_ranges(ranges: str, whole: str) -> list[str]:
    values = []
    for part in ranges.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise UserError(f"SLURM_JOB_NODELIST '{whole}': bad range '{part}'")
            values.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
        elif part.isdigit():
            values.append(part)
        else:
            raise UserError(f"SLURM_JOB_NODELIST '{whole}': bad range '{part}'")
    return values
