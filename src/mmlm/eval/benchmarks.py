"""The metric and answer parser each public benchmark's official scoring code uses, by the names users type.

`mmlm score docvqa predictions.jsonl` looks its name up here (`BENCHMARK_SCORING`); the converters of
`mmlm.eval.official_formats` write the same pair into the task files they make.

  vqav2, textvqa  VQA accuracy (vqaEval.py / TextVQA's m4c evaluator: the EvalAI answer normalisation and
                  min(1, matches/3) over the ten leave-one-out subsets), first line of the response.
  docvqa, infovqa ANLS (the RRC DocVQA / InfographicVQA task), on the response as given.
  chartqa         relaxed accuracy (Pix2Struct's relaxed_correctness), on the response as given.
  pope            POPE's evaluate.py: its yes/no rule, accuracy, precision, recall, F1, yes-ratio.
  mmmu            MMMU's eval_utils.py on the raw response: the letter parse_multi_choice_response picks
                  (`mmmu_option`) for a sample with choices, eval_open over parse_open_response's candidates
                  (`mmlm.eval.mmmu`) for an open question.
  mmbench         accuracy of the option letter (`option_letter`, MMBench's and lmms-eval's matchers).
  coco-caption    BLEU-1..4 and CIDEr-D with pycocoevalcap's PTB tokenizer.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Scoring:
    """A benchmark's metric (a name in `metrics.METRICS`) and parser (a name in `parsers.PARSERS`)."""

    metric: str
    parser: str


BENCHMARK_SCORING: dict[str, Scoring] = {
    "vqav2": Scoring("vqa_accuracy", "vqa"),
    "textvqa": Scoring("vqa_accuracy", "vqa"),
    "docvqa": Scoring("anls", "raw"),
    "infovqa": Scoring("anls", "raw"),
    "chartqa": Scoring("relaxed_accuracy", "raw"),
    "pope": Scoring("pope", "yes_no"),
    "mmmu": Scoring("mmmu", "raw"),
    "mmbench": Scoring("multiple_choice", "option_letter"),
    "coco-caption": Scoring("caption", "caption"),
}
