"""Judges for stage-2 mining (SPEC §4.3): rule metrics (VQA accuracy, ANLS, relaxed match) and a local HF LLM judge."""
from __future__ import annotations

import inspect
import re
import string
import unicodedata
from dataclasses import dataclass
from typing import Protocol

import torch

from qzoom_adapters.errors import QZoomError


@dataclass
class JudgeItem:
    question: str
    answers: list[str]  # ground truths (any of them counts)
    responses: dict[str, str]  # e.g. {"A": base model, direct; "B": stage-1 model, zoomed}


@dataclass
class Verdict:
    correct: dict[str, bool]  # same keys as JudgeItem.responses
    raw: str | None = None  # the judge's reply (HFJudge) or the scores (RuleJudge)


class Judge(Protocol):
    def judge(self, items: list[JudgeItem]) -> list[Verdict]: ...


# ---------------------------------------------------------------------------------------------- normalisation

_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")


def _is_punct(c: str) -> bool:
    return c in string.punctuation or unicodedata.category(c)[0] in "PS"  # P*: punctuation, S*: $ % ° € ...


def normalize_answer(s: str) -> str:
    """Lower-case, no punctuation, no articles, number words zero..ten as digits, single spaces.

    Apostrophes are removed ("don't" -> "dont"); other punctuation becomes a space, so "left-hand" and
    "left hand" agree. Thousands separators go ("1,234" -> "1234") and decimal points stay ("3.5").
    """
    s = _THOUSANDS.sub("", str(s).lower().strip())
    s = s.replace("'", "").replace("\u2019", "")
    s = _NON_DECIMAL_PERIOD.sub(" ", s)
    s = "".join(" " if c != "." and _is_punct(c) else c for c in s)
    return " ".join(_NUMBER_WORDS.get(w, w) for w in s.split() if w not in _ARTICLES)


# ---------------------------------------------------------------------------------------------- metrics

def _check_answers(answers: list[str]) -> None:
    if isinstance(answers, str) or not answers:
        raise QZoomError(f"ground truths must be a non-empty list of strings, got {answers!r}; "
                         "wrap a single answer in a list")


def vqa_accuracy(pred: str, answers: list[str]) -> float:
    """min(#matching ground truths / 3, 1) after normalisation; with fewer than 3 ground truths, / len(answers)."""
    _check_answers(answers)
    p = normalize_answer(pred)
    hits = sum(normalize_answer(g) == p for g in answers)
    return min(hits / min(3, len(answers)), 1.0)  # a single-answer dataset must be able to reach 1


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(pred: str, answers: list[str], tau: float = 0.5) -> float:
    """Max over ground truths of 1 - normalised edit distance, or 0 where that is below tau."""
    _check_answers(answers)
    p, best = normalize_answer(pred), 0.0
    for g in map(normalize_answer, answers):
        longest = max(len(p), len(g))
        sim = 1.0 - levenshtein(p, g) / longest if longest else 1.0
        best = max(best, sim if sim >= tau else 0.0)
    return best


_NUMBER = re.compile(r"([+-]?)[$€£¥]?\s*(\d+(?:\.\d+)?|\.\d+)\s*%?")


def parse_number(s: str) -> float | None:
    """The number in "12%", "1,234", "$3.5", "-0.7" (the whole string must be one number), else None."""
    m = _NUMBER.fullmatch(_THOUSANDS.sub("", str(s).strip()))
    if m is None:
        return None
    return float(m.group(1) + m.group(2))  # "12%" counts as 12: answers often drop or add the sign


def relaxed_match(pred: str, answers: list[str], tol: float = 0.05) -> float:
    """1.0 if some ground truth matches: numbers within tol relative error, other strings exactly after normalising."""
    _check_answers(answers)
    p = parse_number(pred)
    for g in answers:
        gv = parse_number(g)
        if p is not None and gv is not None:
            if abs(p - gv) <= tol * abs(gv):
                return 1.0
        elif normalize_answer(pred) == normalize_answer(g):  # also "ten" vs "10"
            return 1.0
    return 0.0


class RuleJudge:
    """Correct iff the metric's score >= threshold; needs no model."""

    METRICS = ("auto", "vqa", "anls", "relaxed")

    def __init__(self, metric: str = "auto", threshold: float = 0.5):
        if metric not in self.METRICS:
            raise QZoomError(f"unknown rule-judge metric {metric!r}; use one of {', '.join(self.METRICS)}")
        if not 0.0 <= threshold <= 1.0:
            raise QZoomError(f"rule-judge threshold must be in [0, 1], got {threshold}")
        self.metric, self.threshold = metric, threshold

    def score(self, pred: str, answers: list[str]) -> float:
        metric = self.metric
        if metric == "auto":  # numeric answers (charts) need tolerance; text needs VQA consensus or ANLS
            _check_answers(answers)
            metric = "relaxed" if all(parse_number(g) is not None for g in answers) else "vqa_anls"
        if metric == "vqa_anls":
            return max(vqa_accuracy(pred, answers), anls(pred, answers))
        return {"vqa": vqa_accuracy, "anls": anls, "relaxed": relaxed_match}[metric](pred, answers)

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        verdicts = []
        for item in items:
            scores = {k: self.score(r, item.answers) for k, r in item.responses.items()}
            verdicts.append(Verdict({k: s >= self.threshold for k, s in scores.items()},
                                    raw="\n".join(f"{k}: {s:.3f}" for k, s in scores.items())))
        return verdicts


# ---------------------------------------------------------------------------------------------- LLM judge

JUDGE_PROMPT = (
    "You are grading answers to a question about an image.\n"
    "Question: {question}\n"
    "Ground truth: {ground_truth}\n"
    "{responses}\n"
    "For each response, decide whether it gives the same answer as the ground truth (the wording may differ).\n"
    "Reply with exactly {n_lines} lines and nothing else:\n"
    "{reply_format}"
)
YES, NO = " Yes", " No"  # the two continuations compared after each "A:" / "B:"


def judge_prompt(item: JudgeItem) -> str:
    """JUDGE_PROMPT filled in for one item (one "Response K:" line and one reply line per response)."""
    keys = list(item.responses)
    return JUDGE_PROMPT.format(
        question=item.question, ground_truth=" | ".join(dict.fromkeys(item.answers)),
        responses="\n".join(f"Response {k}: {r}" for k, r in item.responses.items()), n_lines=len(keys),
        reply_format="\n".join(f"{k}: Yes/No" for k in keys))


class HFJudge:
    """An LLM judge whose reply is always parseable: "K: Yes/No" is chosen per response by likelihood.

    For each response key in turn the reply so far plus "K:" is teacher-forced, and " Yes" wins iff the sum of
    its token log-probs is higher than that of " No" (ties go to No). The model must be in eval mode.
    """

    def __init__(self, model, tokenizer, max_length: int = 4096, batch_size: int = 16):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        params = inspect.signature(model.forward).parameters
        self._takes = {k for k in ("position_ids", "logits_to_keep") if k in params}
        self._pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)

    @classmethod
    def from_pretrained(cls, path: str, dtype="auto", device: str | None = None, max_length: int = 4096,
                        batch_size: int = 16, **model_kwargs) -> HFJudge:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **model_kwargs).eval()
        if device is not None:
            model.to(device)
        return cls(model, AutoTokenizer.from_pretrained(path), max_length=max_length, batch_size=batch_size)

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        return self.judge_margins(items)[0]

    @torch.no_grad()
    def judge_margins(self, items: list[JudgeItem]) -> tuple[list[Verdict], list[dict[str, float]]]:
        """The verdicts, and per item and key the margin log p(" Yes") - log p(" No")."""
        for item in items:
            _check_answers(item.answers)
            if not item.responses:
                raise QZoomError("a JudgeItem has no responses; give e.g. responses={'A': ..., 'B': ...}")
        contexts = [self._render(item) for item in items]
        replies: list[list[str]] = [[] for _ in items]
        margins: list[dict[str, float]] = [{} for _ in items]
        n_keys = max((len(item.responses) for item in items), default=0)
        for step in range(n_keys):  # one teacher-forced step per key, batched over the items that have it
            todo = [i for i, item in enumerate(items) if step < len(item.responses)]
            keys = [list(items[i].responses)[step] for i in todo]
            prefixes = [contexts[i] + "".join(f"{r}\n" for r in replies[i]) + f"{k}:" for i, k in zip(todo, keys)]
            scores = self._score(prefixes, [YES, NO])
            for i, k, (yes, no) in zip(todo, keys, scores):
                margins[i][k] = yes - no
                replies[i].append(f"{k}:{YES if yes > no else NO}")
        verdicts = [Verdict({k: m > 0 for k, m in mg.items()}, raw="\n".join(r)) for mg, r in zip(margins, replies)]
        return verdicts, margins

    # -- internals

    def _chat(self, prompt: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        return (tok.bos_token or "") + prompt + "\n\n"  # plain text; ids are encoded without added specials

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, item: JudgeItem) -> str:
        """The chat prompt, with the longest field halved until prompt + reply fit in max_length tokens."""
        item = JudgeItem(item.question, list(item.answers), dict(item.responses))
        longest_reply = "".join(f"{k}:{YES}\n" for k in item.responses)
        for _ in range(100):
            text = self._chat(judge_prompt(item))
            if len(self._encode(text + longest_reply)) <= self.max_length:
                return text
            fields = [("responses", k) for k in item.responses] + [("answers", j) for j in range(len(item.answers))]
            name, key = max(fields, key=lambda f: len(getattr(item, f[0])[f[1]]))
            value = getattr(item, name)[key]
            if len(value) <= 16:
                break
            getattr(item, name)[key] = value[: len(value) // 2] + "..."  # long responses are rambling, not the answer
        raise QZoomError(f"the judge prompt for question {item.question[:60]!r} does not fit in max_length="
                         f"{self.max_length} tokens; raise max_length")

    def _score(self, contexts: list[str], candidates: list[str]) -> list[list[float]]:
        """Sum of token log-probs of each candidate after each context, tokenised in context."""
        seqs, n_scored = [], []
        for ctx in contexts:
            ids = [self._encode(ctx + c) for c in candidates]
            k = _common_prefix(ids)  # candidates are scored from where their tokenisations part (BPE may merge)
            k = min(k, min(map(len, ids)) - 1)  # a candidate that is a token prefix of another still scores >= 1
            seqs += ids
            n_scored += [len(s) - k for s in ids]
        out = []
        for b in range(0, len(seqs), self.batch_size):
            out += self._forward(seqs[b:b + self.batch_size], n_scored[b:b + self.batch_size])
        n = len(candidates)
        return [out[i:i + n] for i in range(0, len(out), n)]

    def _forward(self, seqs: list[list[int]], n_scored: list[int]) -> list[float]:
        """Left-padded batch: sum of log-probs of the last n_scored[r] tokens of each row."""
        length, keep = max(map(len, seqs)), max(n_scored) + 1
        device = getattr(self.model, "device", None) or next(self.model.parameters()).device
        ids = torch.full((len(seqs), length), self._pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, length - len(s):] = torch.tensor(s)
            mask[r, length - len(s):] = 1
        ids, mask = ids.to(device), mask.to(device)
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in self._takes:  # left padding must not shift positions (absolute embeddings, M-RoPE)
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if "logits_to_keep" in self._takes:  # left padding puts every scored token at the end: keep only those
            kwargs["logits_to_keep"] = keep
        logits = self.model(**kwargs).logits[:, -keep:].float()
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, -(keep - 1):, None])[..., 0]
        return [logp[r, logp.shape[1] - n:].sum().item() for r, n in enumerate(n_scored)]


def _common_prefix(seqs: list[list[int]]) -> int:
    k = 0
    while all(len(s) > k for s in seqs) and len({s[k] for s in seqs}) == 1:
        k += 1
    return k


def make_judge(name: str, **kw) -> Judge:
    """"rule" -> RuleJudge(**kw); "hf" -> HFJudge.from_pretrained(path=..., **kw)."""
    if name == "rule":
        return RuleJudge(**kw)
    if name == "hf":
        if "path" not in kw:
            raise QZoomError("make_judge('hf') needs path=<local dir or hub id of a causal LM>")
        return HFJudge.from_pretrained(kw.pop("path"), **kw)
    raise QZoomError(f"unknown judge {name!r}; use 'rule' (no model) or 'hf' (with path=...)")
