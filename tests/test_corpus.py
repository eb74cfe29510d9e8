"""train/corpus.py: the built-in model was trained on its stories, so they must not change; the
mood-free stories (make_story(neutral=True)) that bench/interventions_effect.py uses as the
reference for "no mood" must carry no mood."""

from __future__ import annotations

import hashlib
import random
import re

import pytest

from train.corpus import MOOD_ENDINGS, MOOD_WORDS, MOODS, NEUTRAL, generate, make_story

# sha256 of the documents below joined by NUL, computed with train/corpus.py as it was at
# ddfe704 (before the neutral stories were added): the corpus the built-in model was trained on
TRAINING_DOCS_SHA256 = "f99b294e176cf84bbdf17b386ad57a867175459c757881dc80e9034bb06e0f7f"


def test_the_training_documents_are_unchanged():
    docs = generate(1, 300) + generate(2, 100, mood_opening=True)
    assert hashlib.sha256("\x00".join(docs).encode()).hexdigest() == TRAINING_DOCS_SHA256


def test_mood_free_stories_have_no_mood_word_and_the_corpus_beats():
    rng = random.Random(0)
    mood_words = {w for m in MOODS for w in MOOD_WORDS[m]}
    lengths = []
    for _ in range(500):
        story = make_story(rng, neutral=True)
        assert story.mood == NEUTRAL
        words = set(re.findall(r"[a-z]+", story.text.lower()))
        assert not words & mood_words, story.text
        # the story's own attributes are in it, as in every corpus story
        assert story.name in story.text and story.animal in story.text, story.text
        lengths.append(len(story.text.split()))
    # about as long as a mood story without its closing sentence (the mood's events are longer
    # sentences than the animal's doings that replace them: 58 against 65 words on average)
    rng = random.Random(0)
    moody = []
    for _ in range(500):
        text = make_story(rng).text
        moody.append(len(text[:max(text.rfind(". "), text.rfind("\n")) + 1].split()))
    assert 0.85 < sum(lengths) / sum(moody) < 1.0


def test_a_neutral_story_takes_no_mood():
    with pytest.raises(ValueError, match="no mood"):
        make_story(random.Random(0), neutral=True, mood="happy")
    with pytest.raises(ValueError, match="no mood"):
        make_story(random.Random(0), neutral=True, mood_opening=True)


def _body_and_closing(text: str) -> tuple[str, str]:
    cut = max(text.rfind(". "), text.rfind("\n")) + 1  # the closing is the last sentence
    return text[:cut], text[cut:].strip()


def test_mood_free_stories_with_a_coin_flip_closing():
    """The second chat stage's mood-free stories: no mood word before the closing, and the
    closing one of a mood's closings (MOOD_ENDINGS), each mood about half the time."""
    rng = random.Random(0)
    endings = {m: [re.escape(e).replace(r"\{", "{").replace(r"\}", "}") for e in MOOD_ENDINGS[m]]
               for m in MOODS}
    patterns = {m: [re.compile(re.sub(r"\{\w+\}", r"\\w+", e)) for e in endings[m]]
                for m in MOODS}
    mood_words = {w for m in MOODS for w in MOOD_WORDS[m]}
    closings = {m: 0 for m in MOODS}
    n = 2000
    for _ in range(n):
        story = make_story(rng, neutral=True, coin_closing=True)
        assert story.mood == NEUTRAL
        body, closing = _body_and_closing(story.text)
        assert not set(re.findall(r"[a-z]+", body.lower())) & mood_words, story.text
        kinds = [m for m in MOODS if any(p.fullmatch(closing) for p in patterns[m])]
        assert len(kinds) == 1, closing
        closings[kinds[0]] += 1
    assert abs(closings["happy"] / n - 0.5) < 0.05, closings  # 4.5 standard deviations


def test_neutral_share_is_that_share_of_the_plain_stories():
    docs = generate(5, 4000, chat_share=0.75, neutral_share=1 / 3)
    mood_words = {w for m in MOODS for w in MOOD_WORDS[m]}
    plain = [d for d in docs if not d.startswith("<|im_start|>")]
    free = [d for d in plain
            if not set(re.findall(r"[a-z]+", _body_and_closing(d)[0].lower())) & mood_words]
    assert 0.2 < len(plain) / len(docs) < 0.3
    assert abs(len(free) / len(plain) - 1 / 3) < 0.05, (len(free), len(plain))
    with pytest.raises(ValueError, match="coin_closing"):
        make_story(random.Random(0), coin_closing=True)
