"""First-clause aggregation: early first chunk, sentences afterwards, no false splits."""

from __future__ import annotations

import asyncio

from pipeswitch.processors.clause_aggregator import FirstClauseAggregator


async def feed(agg: FirstClauseAggregator, tokens: list[str]) -> list[str]:
    out = []
    for tok in tokens:
        async for a in agg.aggregate(tok):
            out.append(a.text)
    last = await agg.flush()
    if last and last.text:
        out.append(last.text)
    return out


async def test_first_clause_goes_out_alone_then_sentences() -> None:
    tokens = [
        "Sure,",
        "I",
        "can",
        "help",
        "with",
        "that,",
        "of",
        "course.",
        "We",
        "open",
        "at",
        "nine.",
        "Bye",
    ]
    out = await feed(FirstClauseAggregator(min_words=1), [t + " " for t in tokens])
    assert out[0] == "Sure,"
    assert out[1] == "I can help with that, of course."
    assert out[2] == "We open at nine."


async def test_times_and_numbers_are_not_clause_breaks() -> None:
    out = await feed(
        FirstClauseAggregator(min_words=1),
        ["We open at 10:", "00 ", "and ", "close at 1,000 ", "pm. "],
    )
    assert out[0].startswith("We open at 10:00 and close at 1,000")


async def test_short_openers_wait_for_enough_words() -> None:
    out = await feed(
        FirstClauseAggregator(min_words=3), ["Hi, ", "yes, ", "we are open, ", "come by. "]
    )
    assert out[0] == "Hi, yes, we are open,"


async def test_each_response_gets_its_first_clause() -> None:
    agg = FirstClauseAggregator(min_words=1)
    first = await feed(agg, ["Okay, ", "done. "])
    second = await feed(agg, ["Right, ", "next. "])
    assert first[0] == "Okay," and second[0] == "Right,"


async def test_a_slow_first_sentence_goes_out_at_a_word_boundary() -> None:
    """No clause mark, tokens arriving slowly (a one-thread local LLM): the first chunk
    leaves once it has waited max_wait_s, at a word boundary but never right after a
    number (its unit may follow)."""
    agg = FirstClauseAggregator(min_words=3, max_wait_s=0.05)
    out: list[str] = []

    async def say(tok: str) -> None:
        async for a in agg.aggregate(tok):
            out.append(a.text)

    for tok in ["We ", "are ", "open ", "from ", "9"]:
        await say(tok)
    assert out == [], "nothing is late yet"
    await asyncio.sleep(0.06)
    await say(" am")  # late: but not "from 9 | am"
    assert out == []
    await say(" to")
    assert out == ["We are open from 9 am"]
    for tok in [" noon. ", "Anything ", "else? "]:
        await say(tok)
    assert out[1:] == ["to noon."]
    last = await agg.flush()
    assert last is not None and last.text.strip() == "Anything else?"
    # The next response waits afresh.
    out.clear()
    await say("Sure ")
    await say("thing ")
    await say("now ")
    assert out == []


async def test_a_fast_first_sentence_is_not_split() -> None:
    """A cloud LLM ends its first sentence before the wait is up: one chunk."""
    out = await feed(
        FirstClauseAggregator(min_words=3, max_wait_s=5.0),
        ["I'm ", "currently ", "open ", "from ", "nine ", "to ", "five. "],
    )
    assert out[0] == "I'm currently open from nine to five."
