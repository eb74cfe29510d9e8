"""train/corpus.py: the built-in model was trained on its stories, so they must not change; the
mood-free stories (make_story(neutral=True)) that bench/interventions_effect.py uses as the
reference for "no mood" must carry no mood."""

from __future__ import annotations

import hashlib
import random
import re

import pytest

from train.corpus import MOOD_WORDS, MOODS, NEUTRAL, generate, make_story

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
