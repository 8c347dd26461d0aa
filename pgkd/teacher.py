"""The teacher behind a small interface, and its OpenAI-compatible client.

A teacher does two things: ``label(texts)`` (one taxonomy label per text) and
``generate(report, mined, target_classes, n)`` (new labelled samples for the
weakest classes, PGKD step 4). :class:`OpenAITeacher` talks to any
OpenAI-compatible endpoint (OpenAI, Azure, vLLM, Ollama, llama.cpp server, or
:mod:`pgkd.simulator` for offline runs) with the request contract of
:mod:`pgkd.prompts`.

Failures that a retry can fix (HTTP 429 honouring Retry-After, 408/409/5xx,
timeouts, connection errors, answers that are not the JSON asked for or miss a
label) are retried with exponential backoff and jitter; after the last try the
call raises :class:`TeacherError` with a one-line reason. Before every HTTP
call a spent budget raises :class:`BudgetExhausted`. The API key is never
logged and never part of a message or repr.

Budget, strictly: every request carries ``max_tokens``, so the most one call
can cost is known before it is made (prompt tokens are at most the prompt's
UTF-8 bytes plus a few per message, completion tokens at most ``max_tokens``).
With a :class:`SpendGate` (the stream's shared ledger in Redis) that worst case
is booked before the call and replaced by the real cost after it, so the
workers together never spend past the budget.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import openai
from pydantic import SecretStr

from pgkd.data import LabelledTexts
from pgkd.errors import BudgetExhausted, ConfigError, TeacherError
from pgkd.prompts import (
    JSON_OBJECT_FORMAT,
    ResponseFormatError,
    build_generation_messages,
    build_label_messages,
    estimate_tokens,
    generation_response_format,
    label_response_format,
    parse_labels,
    parse_samples,
    preview,
)
from pgkd.report import report_to_text

if TYPE_CHECKING:
    from pgkd.mining import Mined
    from pgkd.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

LABEL_TEMPERATURE = 0.0  # labelling wants the teacher's single best answer
GENERATION_TEMPERATURE = 0.7  # generation wants diverse texts, not the same few
RETRY_AFTER_CAP_S = 120.0  # a Retry-After longer than this is a misbehaving server
_RETRYABLE_STATUS = {408, 409, 429}  # plus every 5xx
_FORMAT_LEVELS = ("json_schema", "json_object", "none")  # response_format, best first
# max_tokens of a request: '{"i": 12, "label": "card_payment_fee_charged"},' is ~15 tokens; a
# generated sample (a text of a sentence or two, its label, the JSON around it) rarely passes 60
LABEL_MAX_TOKENS = (64, 40)  # base, per text
GENERATION_MAX_TOKENS = (256, 120)  # base, per sample asked for
TOKENS_PER_MESSAGE = 8  # chat-format overhead per message, generous (OpenAI's is 3-4)


def max_prompt_tokens(messages: Sequence[dict[str, str]]) -> int:
    """An upper bound on the prompt tokens of ``messages`` for a byte-level BPE
    tokenizer (every token covers at least one UTF-8 byte).

    >>> max_prompt_tokens([{"role": "user", "content": "héllo"}])
    30
    """
    return sum(len(m["content"].encode("utf-8")) + TOKENS_PER_MESSAGE for m in messages) + 16


@runtime_checkable
class SpendGate(Protocol):
    """A shared budget that books a call's worst-case cost before it is made
    (:class:`pgkd.teacher_cache.SpendLedger` in the stream)."""

    async def reserve(self, max_cost_usd: float) -> bool: ...  # False: it would take the total past the budget

    async def settle(self, reserved_usd: float, cost_usd: float) -> None: ...


@dataclass
class Usage:
    """What the teacher has cost so far. ``calls`` counts HTTP requests sent
    (retries included), ``errors`` the failed ones, ``retries`` the re-tries."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    errors: int = 0
    retries: int = 0

    def add(
        self,
        *,
        calls: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost_usd: float = 0.0,
        errors: int = 0,
        retries: int = 0,
    ) -> None:
        self.calls += calls
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cost_usd += cost_usd
        self.errors += errors
        self.retries += retries

    def copy(self) -> Usage:
        return Usage(**asdict(self))

    def __sub__(self, earlier: Usage) -> Usage:
        """The usage since ``earlier`` (a :meth:`copy` taken before), e.g. for metric counters."""
        return Usage(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self) | {"cost_usd": round(self.cost_usd, 6)}


@dataclass(frozen=True)
class GenerationResult:
    """New samples from one generation request, and what was dropped by reason."""

    samples: LabelledTexts
    requested: int
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return len(self.samples)


@runtime_checkable
class Teacher(Protocol):
    usage: Usage

    def label(self, texts: Sequence[str]) -> list[str]: ...

    def generate(
        self,
        report: dict | str,
        mined: Mined,
        target_classes: Sequence[str],
        n: int,
        known_texts: Collection[str] = (),
    ) -> GenerationResult: ...

    async def alabel(self, texts: Sequence[str]) -> list[str]: ...

    async def agenerate(
        self,
        report: dict | str,
        mined: Mined,
        target_classes: Sequence[str],
        n: int,
        known_texts: Collection[str] = (),
    ) -> GenerationResult: ...


class _Retry(Exception):
    """A failure a later try may not have; ``delay_s`` is the server's Retry-After."""

    def __init__(self, reason: str, delay_s: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.delay_s = delay_s


class OpenAITeacher:
    """A teacher behind an OpenAI-compatible chat completions endpoint.

    ``alabel``/``agenerate`` are the async core (for the stream's event loop);
    ``label``/``generate`` run them with ``asyncio.run`` and so must not be
    called from inside a running event loop (they raise RuntimeError there).
    Label requests carry ``batch_size`` texts each; at most ``concurrency``
    requests are in flight at once. Its own ``budget_usd`` is checked before
    each call against what this client spent, so concurrent calls can overshoot
    it by those in flight; a ``spend`` gate books each call's worst case first
    and cannot be overshot.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        taxonomy: Sequence[str],
        few_shot: Sequence[tuple[str, str]] = (),
        timeout_s: float = 30.0,
        max_retries: int = 4,
        concurrency: int = 4,
        price_prompt_per_mtok: float = 3.0,
        price_completion_per_mtok: float = 15.0,
        budget_usd: float | None = None,
        batch_size: int = 16,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        seed: int | None = None,
        spend: SpendGate | None = None,
    ):
        if len(set(taxonomy)) < 2 or len(set(taxonomy)) != len(taxonomy):
            raise ConfigError(f"teacher taxonomy needs at least 2 distinct labels, no repeats; got {len(taxonomy)}")
        for name, value, low in (("batch_size", batch_size, 1), ("concurrency", concurrency, 1),
                                 ("max_retries", max_retries, 0)):
            if value < low:
                raise ConfigError(f"teacher {name} must be >= {low}, got {value}")
        self.base_url = base_url
        self.model = model
        self.taxonomy = list(taxonomy)
        self.few_shot = list(few_shot)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.price_prompt_per_mtok = price_prompt_per_mtok
        self.price_completion_per_mtok = price_completion_per_mtok
        self.budget_usd = budget_usd
        self.batch_size = batch_size
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.usage = Usage()
        self.spend = spend
        # Local servers accept any key, but the client refuses an empty one.
        self._api_key = SecretStr(api_key or "not-needed")
        self._rng = random.Random(seed)
        self._format_level = 0  # index into _FORMAT_LEVELS; only ever goes down the list
        self._session: tuple[asyncio.AbstractEventLoop, openai.AsyncOpenAI, asyncio.Semaphore] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, taxonomy: Sequence[str], **overrides: Any) -> OpenAITeacher:
        """A teacher configured by the ``teacher_*`` settings (key: PGKD_TEACHER_API_KEY, else OPENAI_API_KEY)."""
        kwargs: dict[str, Any] = dict(
            base_url=settings.teacher_base_url,
            model=settings.teacher_model,
            api_key=settings.teacher_key(),
            taxonomy=taxonomy,
            timeout_s=settings.teacher_timeout_s,
            max_retries=settings.teacher_max_retries,
            concurrency=settings.teacher_concurrency,
            price_prompt_per_mtok=settings.teacher_price_prompt_per_mtok,
            price_completion_per_mtok=settings.teacher_price_completion_per_mtok,
            budget_usd=settings.teacher_budget_usd,
            batch_size=settings.teacher_batch_size,
        )
        return cls(**(kwargs | overrides))

    def __repr__(self) -> str:
        return (
            f"OpenAITeacher(base_url={self.base_url!r}, model={self.model!r}, classes={len(self.taxonomy)}, "
            f"batch_size={self.batch_size}, concurrency={self.concurrency}, budget_usd={self.budget_usd})"
        )

    # --- the two operations -------------------------------------------------------

    async def alabel(self, texts: Sequence[str]) -> list[str]:
        """One taxonomy label per text, in order; raises TeacherError after the last try."""
        texts = list(texts)
        batches = [texts[i : i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        results = await _gather_or_cancel([self._label_batch(batch) for batch in batches])
        return [label for batch_labels in results for label in batch_labels]

    async def agenerate(
        self,
        report: dict | str,
        mined: Mined,
        target_classes: Sequence[str],
        n: int,
        known_texts: Collection[str] = (),
    ) -> GenerationResult:
        """Up to ``n`` new samples of ``target_classes``, validated against the
        taxonomy, each other and ``known_texts``; the prompt carries the whole
        report (a :func:`~pgkd.report.classification_report` dict, or its text)."""
        outside = [c for c in target_classes if c not in self.taxonomy]
        if outside:
            raise ValueError(f"target class {outside[0]!r} is not in the teacher's taxonomy")
        report_text = report if isinstance(report, str) else report_to_text(report)
        messages = build_generation_messages(self.taxonomy, target_classes, n, report_text, mined, self.few_shot)

        def parse(content: str) -> tuple[LabelledTexts, dict[str, int]]:
            samples, rejected = parse_samples(content, self.taxonomy, known_texts, target_classes)
            if "invalid_json" in rejected:
                raise ResponseFormatError(f'invalid_json: answer has no "samples" list: {preview(content)}')
            return samples, rejected

        samples, rejected = await self._ask(
            messages, generation_response_format(target_classes), GENERATION_TEMPERATURE, parse,
            GENERATION_MAX_TOKENS[0] + GENERATION_MAX_TOKENS[1] * n,
        )
        return GenerationResult(samples=samples, requested=n, rejected=rejected)

    def label(self, texts: Sequence[str]) -> list[str]:
        """Sync :meth:`alabel`; not from inside a running event loop."""
        return self._run_sync(self.alabel(texts))

    def generate(
        self,
        report: dict | str,
        mined: Mined,
        target_classes: Sequence[str],
        n: int,
        known_texts: Collection[str] = (),
    ) -> GenerationResult:
        """Sync :meth:`agenerate`; not from inside a running event loop."""
        return self._run_sync(self.agenerate(report, mined, target_classes, n, known_texts))

    async def aclose(self) -> None:
        """Close the HTTP client of the current event loop (a later call opens a new one)."""
        if self._session is not None:
            _loop, client, _sem = self._session
            self._session = None
            await client.close()

    # --- one request, with retries --------------------------------------------------

    async def _label_batch(self, texts: list[str]) -> list[str]:
        messages = build_label_messages(texts, self.taxonomy, self.few_shot)

        def parse(content: str) -> list[str]:
            labels = parse_labels(content, len(texts), self.taxonomy)
            missing = sum(label is None for label in labels)
            if missing:
                raise ResponseFormatError(
                    f"no label from the taxonomy for {missing} of {len(texts)} texts: {preview(content)}"
                )
            return labels  # type: ignore[return-value]  # no None left

        max_tokens = LABEL_MAX_TOKENS[0] + LABEL_MAX_TOKENS[1] * len(texts)
        return await self._ask(messages, label_response_format(self.taxonomy), LABEL_TEMPERATURE, parse, max_tokens)

    async def _ask(
        self,
        messages: list[dict[str, str]],
        schema_format: dict[str, Any],
        temperature: float,
        parse: Callable[[str], T],
        max_tokens: int,
    ) -> T:
        """Send, parse, and retry what a retry can fix; BudgetExhausted and
        non-retryable HTTP errors pass straight through."""
        tries = self.max_retries + 1
        reason = ""
        for attempt in range(tries):
            try:
                return parse(await self._complete(messages, schema_format, temperature, max_tokens))
            except (_Retry, ResponseFormatError) as err:
                self.usage.add(errors=1)
                reason = self._redact(" ".join(str(err).split()))
                if attempt + 1 == tries:
                    break
                delay = getattr(err, "delay_s", None)
                delay = min(delay, RETRY_AFTER_CAP_S) if delay is not None else self._backoff(attempt)
                log.warning("teacher try %d/%d failed (%s); retrying in %.2fs", attempt + 1, tries, reason, delay)
                self.usage.add(retries=1)
                await asyncio.sleep(delay)
        raise TeacherError(f"teacher {self.model!r} failed after {tries} tries: {reason}")

    def _backoff(self, attempt: int) -> float:
        # Exponential with "equal jitter": spreads retries of concurrent callers apart.
        cap = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        return cap / 2 + self._rng.uniform(0, cap / 2)

    async def _complete(self, messages: list[dict[str, str]], schema_format: dict[str, Any], temperature: float,
                        max_tokens: int) -> str:
        """One chat completion; the content of its answer, usage accounted."""
        client, semaphore = self._client()
        level = self._format_level
        worst = (max_prompt_tokens(messages) * self.price_prompt_per_mtok
                 + max_tokens * self.price_completion_per_mtok) / 1e6
        async with semaphore:
            while True:
                self._check_budget()
                if self.spend is not None and not await self.spend.reserve(worst):
                    raise BudgetExhausted(
                        f"teacher budget too low for the next call (it may cost up to ${worst:.4f}); "
                        "raise teacher_budget_usd to continue"
                    )
                fmt = (schema_format, JSON_OBJECT_FORMAT, None)[level]
                extra = {"response_format": fmt} if fmt is not None else {}
                self.usage.add(calls=1)
                started = time.perf_counter()
                cost = 0.0  # a call that got no answer is not charged
                try:
                    response = await client.chat.completions.create(
                        model=self.model, messages=messages, temperature=temperature, max_tokens=max_tokens, **extra
                    )
                    cost = self._account(response, messages, _content(response) or "",
                                         time.perf_counter() - started)
                except openai.BadRequestError as err:
                    if level + 1 < len(_FORMAT_LEVELS):
                        # Many servers reject json_schema (or any response_format) with a 400:
                        # ask again with the next weaker format, not counted as an error.
                        level += 1
                        log.info("teacher rejected response_format %s (HTTP 400); trying %s",
                                 _FORMAT_LEVELS[level - 1], _FORMAT_LEVELS[level])
                        continue
                    self.usage.add(errors=1)
                    reason = self._status_reason(err)
                    raise TeacherError(f"teacher {self.model!r} rejected the request: {reason}") from None
                except openai.APIStatusError as err:
                    if err.status_code in _RETRYABLE_STATUS or err.status_code >= 500:
                        raise _Retry(self._status_reason(err), _retry_after(err.response.headers)) from None
                    # 401/403/404/422...: the same request will fail the same way.
                    self.usage.add(errors=1)
                    reason = self._status_reason(err)
                    raise TeacherError(f"teacher {self.model!r} refused the request: {reason}") from None
                except openai.APITimeoutError:
                    raise _Retry(f"timed out after {self.timeout_s:g}s") from None
                except openai.APIConnectionError as err:
                    cause = err.__cause__ or err
                    raise _Retry(f"connection error: {type(cause).__name__}: {cause}") from None
                except openai.APIError as err:  # e.g. a body that is not a chat completion
                    raise _Retry(self._redact(f"unusable response: {type(err).__name__}: {err}")) from None
                finally:
                    if self.spend is not None:
                        await self.spend.settle(worst, cost)
                break
        if level > self._format_level:
            self._format_level = level
        content = _content(response)
        if not content:
            raise _Retry("answer has no message content")
        return content

    def _account(self, response: Any, messages: list[dict[str, str]], content: str, seconds: float) -> float:
        usage = getattr(response, "usage", None)
        if usage is not None and usage.prompt_tokens is not None:
            prompt, completion = usage.prompt_tokens, usage.completion_tokens or 0
        else:  # some servers omit usage: estimate, so cost and budget still move
            prompt = sum(estimate_tokens(m["content"]) for m in messages)
            completion = estimate_tokens(content)
        cost = (prompt * self.price_prompt_per_mtok + completion * self.price_completion_per_mtok) / 1e6
        self.usage.add(prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost)
        log.debug("teacher call: %d prompt + %d completion tokens, $%.6f, %.2fs", prompt, completion, cost, seconds)
        return cost

    def _check_budget(self) -> None:
        if self.budget_usd is not None and self.usage.cost_usd >= self.budget_usd:
            raise BudgetExhausted(
                f"teacher budget of ${self.budget_usd:g} is spent (${self.usage.cost_usd:.4f} used); "
                "raise teacher_budget_usd to continue"
            )

    def _status_reason(self, err: openai.APIStatusError) -> str:
        body = err.body.get("error", err.body) if isinstance(err.body, dict) else err.body
        message = body.get("message") if isinstance(body, dict) else body
        text = " ".join(str(message or err.response.reason_phrase).split())[:160]
        return self._redact(f"HTTP {err.status_code}: {text}")

    def _redact(self, text: str) -> str:
        key = self._api_key.get_secret_value()
        return text.replace(key, "***") if len(key) >= 4 else text

    # --- event-loop plumbing ------------------------------------------------------

    def _client(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        # An async HTTP client and a semaphore belong to one event loop; the sync
        # wrappers start a new loop per call, so build them per loop.
        loop = asyncio.get_running_loop()
        if self._session is None or self._session[0] is not loop:
            client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self._api_key.get_secret_value(),
                timeout=self.timeout_s,
                max_retries=0,  # retries are ours: backoff, Retry-After, budget checks, counting
            )
            self._session = (loop, client, asyncio.Semaphore(self.concurrency))
        return self._session[1], self._session[2]

    def _run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise RuntimeError(
                "OpenAITeacher.label/generate called inside a running event loop; await alabel/agenerate"
            )

        async def run_then_close() -> T:
            try:
                return await coro
            finally:
                await self.aclose()

        return asyncio.run(run_then_close())


def _content(response: Any) -> str | None:
    """The first choice's text; None for an answer without one (refusal, tool call, odd server)."""
    choices = getattr(response, "choices", None) or []
    message = getattr(choices[0], "message", None) if choices else None
    content = getattr(message, "content", None)
    return content if isinstance(content, str) else None


async def _gather_or_cancel(aws: Sequence[Awaitable[T]]) -> list[T]:
    """All results in order; on the first failure cancel the rest and re-raise it
    (plain, not as an ExceptionGroup, so callers catch TeacherError)."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / scale)
        except ValueError:
            pass
        if name == "retry-after":
            try:
                return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                return None
    return None
