"""Writing a VLM evaluation: results.json, samples.jsonl, report.md with a bar chart per task, and the table.

The table has one row per task and per question type, one column per probe (the task's primary metric),
then the multimodal gain (normal − blind) and, where text_only ran, the leakage (blind − text_only).
"""

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SHOWN_PROBES = ("normal", "blind", "shuffled", "text_only")


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Return the header and rows (task, type, n, one figure per probe, gain[, leakage]) of one task."""
    key, probes = result["primary"], result["probes"]
    ran = [p for p in SHOWN_PROBES if p in probes]
    head = ["task", "type", "n", *ran, "gain"] + (["leakage"] if result.get("leakage") else [])

    def row(name: str, n: int, figure, gain, leak) -> list[str]:
        cells = [result["task"], name, str(n), *(f"{figure(p):.4f}" for p in ran)]
        cells.append("n/a" if gain is None else f"{gain:+.4f}")
        return cells + ([] if not result.get("leakage") else ["n/a" if leak is None else f"{leak:+.4f}"])

    gain, leakage = result.get("gain") or {}, result.get("leakage") or {}
    rows = [row(f"all ({key})", result["num_samples"], lambda p: probes[p]["metrics"][key],
                gain.get("all"), leakage.get("all"))]  # fmt: skip
    for name, figures in probes[ran[0]]["by_type"].items():
        rows.append(row(name, figures["n"], lambda p, t=name: probes[p]["by_type"][t][key],
                        gain.get("by_type", {}).get(name), leakage.get("by_type", {}).get(name)))  # fmt: skip
    return head, rows


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Return the plain-text table of every task's results, columns aligned."""
    blocks = []
    for result in results:
        head, rows = table_rows(result)
        widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
        lines = ["  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths, strict=True)))
                 for r in [head, *rows]]  # fmt: skip
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def markdown_table(result: dict[str, Any]) -> str:
    """Return one task's table as Markdown."""
    head, rows = table_rows(result)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def figures_table(result: dict[str, Any]) -> str:
    """Return every overall figure of one task (F1, yes-ratio, BLEU, CHAIR, ...) per probe, as Markdown."""
    probes = result["probes"]
    ran = [p for p in SHOWN_PROBES if p in probes]
    types = set(probes[ran[0]]["by_type"])
    names = [k for k, v in probes[ran[0]]["metrics"].items()
             if isinstance(v, (int, float)) and not any(k.endswith(f"_{t}") for t in types)]  # fmt: skip
    lines = ["| figure | " + " | ".join(ran) + " |", "|---|" + "---:|" * len(ran)]
    for name in names:
        cells = [f"{probes[p]['metrics'].get(name, float('nan')):.4f}" for p in ran]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_probes(result: dict[str, Any], path: Path) -> Path:
    """Write a grouped bar chart (normal / blind / shuffled / text_only per type) of one task as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    key, probes = result["primary"], result["probes"]
    ran = [p for p in SHOWN_PROBES if p in probes]
    types = ["all", *probes[ran[0]]["by_type"]]
    x = np.arange(len(types))
    width = 0.8 / len(ran)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(types) + 2), 3.5))
    for k, probe in enumerate(ran):
        values = [probes[probe]["metrics"][key]] + [probes[probe]["by_type"][t][key] for t in types[1:]]
        ax.bar(x + (k - (len(ran) - 1) / 2) * width, values, width, label=probe)
    ax.set_xticks(x, types, rotation=20 if len(types) > 5 else 0)
    ax.set_ylabel(key)
    ax.set_title(f"{result['task']}: {key} per probe")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _file_name(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task)


def write_results(out: str | Path, run: dict[str, Any], results: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """Write results.json (run settings + per-task metrics), samples.jsonl and report.md with charts; return the paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tasks = [{k: v for k, v in r.items() if k != "records"} for r in results]
    paths = {
        "results": folder / "results.json",
        "samples": folder / "samples.jsonl",
        "report": folder / "report.md",
    }
    paths["results"].write_text(json.dumps({**run, "tasks": tasks}, indent=2, ensure_ascii=False) + "\n")
    with paths["samples"].open("w") as stream:
        for result in results:
            for record in result["records"]:
                stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    lines = [f"# VLM evaluation: {run['model']}", "",
             f"Probes: {', '.join(run['probes'])}; OCR: {'on' if run['ocr'] else 'off'}; limit: {run['limit']}; "
             f"decoding: {json.dumps(run['decoding'])}; {run['seconds']} s.", ""]  # fmt: skip
    for result in results:
        chart = plot_probes(result, folder / f"chart_{_file_name(result['task'])}.png")
        lines += [f"## {result['task']}", "", f"Data: `{result['data']}`; parser `{result['parser']}`, "
                  f"metric `{result['metric']}`; {result['generations']['generated']} generated, "
                  f"{result['generations']['cached']} from the cache.", "", markdown_table(result), "",
                  "All figures:", "", figures_table(result), "",
                  f"![{result['task']}]({chart.name})", "", "Prompt template:", "", "```text",
                  result["prompt_template"], "```", "", "Example prompt:", "", "```text",
                  result["example_prompt"], "```", ""]  # fmt: skip
        if result.get("example_model_input"):
            lines += ["As the model receives it:", "", "```text", result["example_model_input"], "```", ""]
        paths[f"chart_{result['task']}"] = chart
    paths["report"].write_text("\n".join(lines))
    return paths
