"""The audit report for people: ``audit.md`` from an :class:`~breastfusion.data.audit.AuditResult`.

:func:`breastfusion.data.audit.write_audit` writes it beside ``audit.json`` (the result's ``to_dict``).
"""

from __future__ import annotations


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return out


def _marks_markdown(m: dict) -> list[str]:
    n = m["n_checked"]
    names = {"fov_cropped": "margins or scanner panels cropped away (field of view smaller than the image)",
             "colour_marks": "coloured overlays (Doppler or region boxes, coloured calipers or text)",
             "grey_marks": "grey burnt-in marks (calipers, dotted lines, text, icons, frame lines)",
             "inner_marks": "marks on the scan itself (not corner icons or lines along the image's edge)",
             "with_marks": "any mark"}
    lines = ["", "## Screen and burnt-in marks", "",
             f"Found by `breastfusion.data.cleaning` (version {m['cleaning_version']}) in {n} images, "
             f"{m['seconds_per_image']:.3f} s per image. `image.clean: fov_marks` crops to the field of view and "
             "paints the marks over, in training and in scoring.", ""]
    lines += _md_table(["finding", "images", "share", "examples"],
                       [[names[k], m[k]["n"], f"{m[k]['fraction']:.1%}", ", ".join(m[k]["examples"][:5])]
                        for k in names])
    if m["fov_cropped"]["n"]:
        lines += ["", f"Cropped images lose {m['fov_cropped']['mean_area_cut']:.1%} of their area on average."]
    if m.get("fov_refused"):
        lines += ["", "Field of view not believed (under 40 % of the image; the whole image is used): "
                  + ", ".join(m["fov_refused"][:10])]
    by = m.get("by_class") or {}
    if len(by) > 1:
        lines += ["", "Per class (a class that carries marks far more often than another gives the network a "
                  "shortcut: clean the images, `image.clean: fov_marks`):", ""]
        lines += _md_table(["class", "images", "marks on the scan", "any mark", "cropped"],
                           [[c, v["n"], f"{v['inner_marks']:.1%}", f"{v['with_marks']:.1%}",
                             f"{v['fov_cropped']:.1%}"] for c, v in by.items()])
    return lines


def render_markdown(result) -> str:
    """``audit.md``: an :class:`~breastfusion.data.audit.AuditResult` for people."""
    r = result
    d = r.to_dict()["summary"]
    lines = [
        "# Dataset audit",
        "",
        f"Root: `{r.root}` — {r.n_cases} cases — audit took {r.seconds:.1f} s.",
        "",
        "## Summary",
        "",
        f"- unreadable images: **{d['unreadable']}**",
        f"- mask issues: **{sum(d['mask_issues'].values())}** {d['mask_issues'] or ''}",
        f"- exact duplicate groups (identical pixels): **{d['exact_duplicate_groups']}**",
        f"- duplicate groups (exact or near): **{d['duplicate_groups']}**, holding "
        f"**{d['images_in_duplicate_groups']}** images",
        f"- groups with conflicting labels: **{d['label_conflict_groups']}**",
        f"- suspicious groups (check by eye: labels differ over a weak link, or a very large group): "
        f"**{d['suspicious_groups']}**",
        f"- clinical columns whose type was decided by rule (check them below): **{d['ambiguous_columns']}**",
        *([f"- images with burnt-in marks on the scan (calipers, text): **{d['images_inner_marks']}**; with any "
           f"mark: **{d['images_with_marks']}**; field of view cropped: **{d['images_fov_cropped']}**"]
          if r.marks else []),
        "",
        "## Class balance",
        "",
    ]
    lines += _md_table(["class", "n", "fraction"], [[c, v["n"], v["fraction"]] for c, v in r.class_counts.items()])
    ns = [v["n"] for c, v in r.class_counts.items() if c != "<missing>"]
    if len(ns) > 1:
        lines += ["", f"Largest / smallest class: {max(ns) / max(min(ns), 1):.2f}."]
    lines += ["", "## Images", ""]
    st = r.image_stats
    if st:
        lines += [
            f"- read: {st['n_read']} of {r.n_cases}; file modes: "
            + ", ".join(f"{m}: {n}" for m, n in st["modes"].items()),
            f"- height {st['height']['min']}–{st['height']['max']} px (median {st['height']['median']:.0f}), "
            f"width {st['width']['min']}–{st['width']['max']} px (median {st['width']['median']:.0f}); "
            f"{st['distinct_sizes']} distinct sizes",
        ]
    if r.marks:
        lines += _marks_markdown(r.marks)
    lines += ["", "## Missing values in clinical columns", ""]
    if r.missing_values:
        lines += _md_table(["column", "missing", "fraction"],
                           [[c, v["missing"], v["fraction"]] for c, v in r.missing_values.items()])
    else:
        lines += ["No clinical columns."]
    lines += ["", "## Clinical column types", ""]
    if r.column_types:
        lines += ["How each clinical column is read (see `breastfusion.data.column_types`). A flagged column "
                  "was decided by rule: check it, and declare its type in `data.column_types` if the rule is "
                  "wrong.", ""]
        lines += _md_table(["column", "type", "missing", "missing markers seen", "flag", "note"], [
            [c, (v.get("kind") or "?") + (" (declared)" if v.get("declared") else "")
             + (f" split at '{v['separator']}'" if v.get("separator") else "")
             + (" levels " + " < ".join(map(str, v["levels"])) if v.get("levels") else ""), v.get("missing"),
             ", ".join(f"'{k}' x{n}" for k, n in (v.get("missing_tokens_seen") or {}).items()),
             ", ".join(v.get("flags") or []),
             v.get("note", "") + ("" if not v.get("examples") else " e.g. " + ", ".join(
                 f"'{e['value']}' ({e['row']})" for e in v["examples"][:3]))]
            for c, v in r.column_types.items()])
    else:
        lines += ["No clinical columns."]
    lines += ["", "## Unreadable images", ""]
    lines += _md_table(["case", "path", "error"], [[u["case_id"], u["path"], u["error"]] for u in r.unreadable]) \
        if r.unreadable else ["None."]
    lines += ["", "## Mask issues", ""]
    lines += _md_table(["case", "kind", "path", "detail"],
                       [[m["case_id"], m["kind"], m["path"], m["detail"]] for m in r.mask_issues]) \
        if r.mask_issues else ["None."]
    lines += ["", "## Label conflicts (one image or near-copy filed under several labels)", ""]
    if r.label_conflicts:
        for g in r.label_conflicts:
            lines.append(f"- **{g['group']}**: " + "; ".join(
                f"`{p}` ({lab})" for p, lab in zip(g["paths"], g["labels"]))
                + (f" — **suspicious**: {g['suspicious']}" if g.get("suspicious") else ""))
    else:
        lines.append("None.")
    if r.suspicious:
        lines += ["", "## Suspicious groups (check by eye before trusting them)", ""]
        for g in r.suspicious:
            lines.append(f"- **{g['group']}** ({g['suspicious']}): " + ", ".join(f"`{p}`" for p in g["paths"]))
    lines += ["", "## Duplicate groups", "",
              f"Method: exact pixel hash, and near-duplicates (texture score >= {r.params.get('near_dup_threshold')} "
              f"after alignment, overlap >= {r.params.get('min_overlap')}). "
              f"{r.params.get('candidate_pairs', 0)} candidate pairs were verified. "
              "A split must keep each group on one side.", ""]
    if r.dup_groups:
        for g in r.dup_groups:
            tag = " (exact copies)" if g["exact"] else f" (weakest link {g['min_link']:.2f})"
            lines.append(f"- {g['group']}{tag}: " + ", ".join(f"`{p}`" for p in g["paths"]))
    else:
        lines.append("None.")
    if r.borderline:
        lines += ["", "## Closest rejected pairs (for review)", ""]
        lines += _md_table(["a", "b", "texture", "overlap", "scale"],
                           [[p["a"], p["b"], p["texture"], p["overlap"], p["scale"]] for p in r.borderline[:10]])
    return "\n".join(lines) + "\n"
