"""A seeded corpus of simple stories and ChatML exchanges with known, balanced attributes.

Every story has a character (boy or girl, with a name), an animal (with a name), a mood, a place
and the weather, each drawn uniformly at random and written into the text through words a test
can count (the constants below). A story's mood words come only from its own mood, so steering
and evaluation can count them. Sentence templates are many per beat and optional beats come in
random order, so a model has to learn the structure rather than copy a few strings.

Documents are plain stories or ChatML conversations (a user asks for a story, perhaps naming
some attributes; the assistant tells one that has them; questions about it, thanks, greetings).
`python train/corpus.py OUT_DIR` writes train.txt and heldout.txt: one JSON string per line.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
GENDERS = ("boy", "girl")
NAMES = {"boy": ("Tom", "Ben", "Sam", "Leo", "Max", "Jack", "Finn", "Noah", "Eli", "Owen"),
         "girl": ("Lily", "Mia", "Anna", "Emma", "Zoe", "Lucy", "Sara", "Ella", "Ruby", "Nora")}
PRONOUNS = {"boy": ("he", "him", "his"), "girl": ("she", "her", "her")}
# words that mark the character's gender in text (for counting; names excluded)
GENDER_WORDS = {"boy": ("boy", "he", "him", "his"), "girl": ("girl", "she", "her")}
ANIMALS = ("dog", "cat", "bird", "rabbit", "fish", "horse", "duck", "frog")
PLURALS = {a: a + "s" for a in ANIMALS}
ANIMAL_NAMES = ("Spot", "Coco", "Pip", "Bella", "Rex", "Daisy", "Buddy", "Sunny", "Fluffy",
                "Nibbles", "Pepper", "Bubbles")
# what each animal does, as "the dog {action}"
ANIMAL_ACTIONS = {
    "dog": ("barked and wagged its tail", "ran in circles", "fetched a stick", "sniffed the grass"),
    "cat": ("purred softly", "chased a leaf", "licked its paw", "curled up in a ball"),
    "bird": ("sang a sweet song", "flew up high", "flapped its wings", "hopped on a branch"),
    "rabbit": ("hopped around", "ate a carrot", "wiggled its nose", "dug a little hole"),
    "fish": ("swam in circles", "blew tiny bubbles", "jumped out of the water", "splashed"),
    "horse": ("galloped across the field", "ate some hay", "shook its mane", "trotted along"),
    "duck": ("quacked loudly", "paddled in the pond", "waddled along", "shook its feathers"),
    "frog": ("jumped on a lily pad", "croaked a song", "caught a fly", "hopped into the pond"),
}
ANIMAL_ADJECTIVES = ("little", "small", "fluffy", "funny", "tiny", "big", "brown", "white")
MOODS = ("happy", "sad")
NEUTRAL = "neutral"  # make_story(neutral=True): no mood's events, words or closing
MOOD_WORDS = {"happy": ("happy", "smiled", "laughed", "joy", "glad"),
              "sad": ("sad", "cried", "tears", "lonely", "upset")}
PLACES = ("park", "forest", "beach", "farm", "garden", "river", "village", "hill")
WEATHERS = ("sunny", "rainy", "snowy", "windy")
WEATHER_WORDS = {"sunny": ("sunny", "sun", "warm"), "rainy": ("rainy", "rain", "wet"),
                 "snowy": ("snowy", "snow", "cold"), "windy": ("windy", "wind", "breeze")}
OBJECTS = ("ball", "kite", "red hat", "blue box", "toy boat", "shiny stone", "book", "apple")


@dataclass(frozen=True)
class Story:
    gender: str
    name: str
    animal: str
    pet: str  # the animal's name
    mood: str
    place: str
    weather: str
    obj: str
    text: str


def _pick(rng: random.Random, options: tuple[str, ...] | list[str]) -> str:
    return options[rng.randrange(len(options))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# -----------------------------------------------------------------------------------------------
# story beats: each a list of templates; {he}/{him}/{his} are the character's pronouns


OPENINGS = [
    "Once upon a time, there was a little {gender} named {name}.",
    "Once upon a time, a {gender} called {name} lived near a {place}.",
    "There once was a {gender} named {name}.",
    "{name} was a little {gender} who loved to play outside.",
    "Long ago, in a small town, there lived a {gender} named {name}.",
    "One morning, a {gender} named {name} woke up early.",
    "{name} was a kind {gender} with a big heart.",
    "In a little house lived a {gender}. {His} name was {name}.",
]
SETTINGS = {
    "sunny": ["It was a sunny day, and the sun was warm.", "The sun was shining and it was warm.",
              "One sunny day, the sky was bright and warm.",
              "The sun was out and the air was warm."],
    "rainy": ["It was a rainy day, and the grass was wet.", "The rain fell all morning.",
              "One rainy day, the sky was gray and everything was wet.",
              "Outside, the rain was falling on the roofs."],
    "snowy": ["It was a snowy day, and the air was cold.", "Snow covered the ground.",
              "One snowy day, white snow fell from the sky.",
              "It was cold, and snow was everywhere."],
    "windy": ["It was a windy day, and the trees were moving.", "The wind was blowing hard.",
              "One windy day, a strong breeze came over the hills.",
              "The wind was strong and the leaves flew around."],
}
GO_TO_PLACE = [
    "{name} went to the {place}.", "{Name_he} walked to the {place} with {his} mom.",
    "{name} wanted to go to the {place}, so {he} went there.",
    "That day, {name} and {his} dad went to the {place}.",
    "{name} ran all the way to the {place}.", "{name} decided to visit the {place}.",
]
MEET_ANIMAL = [
    "At the {place}, {he} saw a {adj} {animal} named {pet}.",
    "There, {name} met a {adj} {animal}. The {animal} was called {pet}.",
    "{name} had a pet {animal} named {pet}, and the {animal} came along too.",
    "Near a tree, {he} found a {adj} {animal}. {Name_he} named it {pet}.",
    "Suddenly, a {adj} {animal} came out. Its name was {pet}.",
    "{name} saw a {animal} at the {place}. The {animal} looked at {him}.",
]
ANIMAL_DOES = [
    "The {animal} {action}.", "{pet} the {animal} {action}.", "Then {pet} {action}.",
    "The {adj} {animal} {action}.",
]
OBJECT_BEATS = [
    "{name} had a {obj} with {him}.", "On the ground, {he} found a {obj}.",
    "{Name_he} showed the {obj} to {pet}.", "{name} put the {obj} in {his} bag.",
]
HAPPY_EVENTS = [
    "{name} and {pet} played together all day, and {name} laughed.",
    "The {animal} licked {his} hand and {name} smiled.",
    "{name} threw the {obj} and the {animal} ran after it. {Name_he} laughed with joy.",
    "{pet} stayed close to {name}, and {he} felt glad.",
    "{name} gave {pet} a big hug. {Name_he} was so happy.",
    "They found a nice spot and sat together. {name} smiled at the {animal}.",
    "{name} and the {animal} ran and jumped. It was full of joy.",
]
SAD_EVENTS = [
    "Then {pet} ran away, and {name} could not find the {animal}. {Name_he} cried.",
    "{name} lost {his} {obj} and felt sad.",
    "The {animal} did not want to play, and {name} felt lonely.",
    "{pet} was sick and could not get up. {name} was upset.",
    "{name} called for {pet}, but the {animal} did not come back. Tears fell from {his} eyes.",
    "{name} sat alone and was very sad.",
    "The {animal} went away with its family. {name} felt lonely and cried.",
]
HAPPY_ENDINGS = [
    "At the end of the day, {name} was very happy.", "{name} smiled all the way home.",
    "It was a day full of joy.", "{name} and {pet} were glad to be friends.",
    "{name} went home happy, and {he} laughed as {he} told {his} mom about {pet}.",
    "{Name_he} felt so glad and happy that night.",
]
SAD_ENDINGS = [
    "At the end of the day, {name} was very sad.", "{name} went home with tears in {his} eyes.",
    "That night, {name} felt lonely and upset.", "{name} cried in {his} bed that night.",
    "{Name_he} missed {pet} and felt sad for a long time.",
    "It was a sad day, and {name} was upset.",
]
# openings that set the mood in the story's first sentence: chat replies to a request naming a
# mood (chat stage 2), so the mood is in the story itself from its start and the events follow it
MOOD_OPENINGS = {
    "happy": ["Once upon a time, there was a happy little {gender} named {name}.",
              "{name} was a happy {gender} who loved to play outside.",
              "One morning, a {gender} named {name} woke up happy and smiled.",
              "There once was a glad little {gender} named {name}."],
    "sad": ["Once upon a time, there was a sad little {gender} named {name}.",
            "{name} was a sad {gender} who often felt lonely.",
            "One morning, a {gender} named {name} woke up sad and upset.",
            "There once was a lonely little {gender} named {name}."],
}
MOOD_EVENTS = {"happy": HAPPY_EVENTS, "sad": SAD_EVENTS}
MOOD_ENDINGS = {"happy": HAPPY_ENDINGS, "sad": SAD_ENDINGS}


def make_story(rng: random.Random, *, gender: str | None = None, animal: str | None = None,
               mood: str | None = None, name: str | None = None, pet: str | None = None,
               place: str | None = None, weather: str | None = None,
               mood_opening: bool = False, neutral: bool = False,
               coin_closing: bool = False) -> Story:
    """A story whose unspecified attributes are drawn uniformly at random; with mood_opening,
    its first sentence names the mood (MOOD_OPENINGS). With neutral, a mood-free story: the
    same beats, with as many beats that carry no mood in place of the mood's events, and no
    closing (its mood is NEUTRAL): a reference for measuring what a model does when nothing in
    a story sets a mood. With coin_closing too, it ends with the closing (MOOD_ENDINGS) of a
    mood drawn at random, 50/50: the training documents that teach a model that a story without
    mood evidence may close either way (its mood stays NEUTRAL: nothing before the closing
    sets it).
    """
    if neutral and (mood is not None or mood_opening):
        raise ValueError("a neutral story has no mood and no mood opening")
    if coin_closing and not neutral:
        raise ValueError("coin_closing is for neutral stories (a mood story closes in its mood)")
    gender = gender or _pick(rng, GENDERS)
    s = {"gender": gender, "name": name or _pick(rng, NAMES[gender]),
         "animal": animal or _pick(rng, ANIMALS), "pet": pet or _pick(rng, ANIMAL_NAMES),
         "mood": NEUTRAL if neutral else mood or _pick(rng, MOODS),
         "place": place or _pick(rng, PLACES),
         "weather": weather or _pick(rng, WEATHERS), "obj": _pick(rng, OBJECTS)}
    he, him, his = PRONOUNS[gender]
    fields = dict(s, he=he, him=him, his=his, His=_cap(his),
                  adj=_pick(rng, ANIMAL_ADJECTIVES))

    actions = rng.sample(ANIMAL_ACTIONS[s["animal"]], len(ANIMAL_ACTIONS[s["animal"]]))

    def fill(template: str) -> str:
        # "Name_he": a sentence subject that is the name or the pronoun, so both occur
        subject = s["name"] if rng.random() < 0.5 else _cap(he)
        action = actions.pop() if "{action}" in template else ""  # no action told twice
        return _cap(template.format(**fields, Name_he=subject, action=action))

    mood = s["mood"]
    # NOTE: only a neutral story takes its own branches here, so every other story consumes
    # the generator exactly as before (the built-in model was trained on them)
    if neutral:  # as many beats as a mood's events, of the animal's doings: they carry no
        # mood, and each tells an action not told yet (4 per animal: at most 2 in the middle)
        events = [_pick(rng, ANIMAL_DOES) for _ in range(rng.choice((1, 2)))]
    else:
        events = rng.sample(MOOD_EVENTS[mood], rng.choice((1, 2)))
    middle = [fill(_pick(rng, ANIMAL_DOES))]
    if rng.random() < 0.5:
        middle.append(fill(_pick(rng, OBJECT_BEATS)))
    if rng.random() < 0.4:
        middle.append(fill(_pick(rng, ANIMAL_DOES)))
    rng.shuffle(middle)
    setting = [fill(_pick(rng, SETTINGS[s["weather"]])), fill(_pick(rng, GO_TO_PLACE))]
    if rng.random() < 0.3:
        setting.reverse()
    openings = MOOD_OPENINGS[mood] if mood_opening else OPENINGS
    sentences = [fill(_pick(rng, openings)), *setting, fill(_pick(rng, MEET_ANIMAL)), *middle,
                 *(fill(e) for e in events),
                 *([] if neutral else [fill(_pick(rng, MOOD_ENDINGS[mood]))])]
    if coin_closing:  # its own draws: reference neutral stories (without it) are unchanged
        sentences.append(fill(_pick(rng, MOOD_ENDINGS[_pick(rng, MOODS)])))
    # a paragraph break sometimes, as stories have
    cut = rng.randrange(2, len(sentences)) if rng.random() < 0.4 else None
    text = " ".join(sentences[:cut]) + ("\n\n" + " ".join(sentences[cut:]) if cut else "")
    return Story(text=text, **s)


# -----------------------------------------------------------------------------------------------
# chat turns


GREETINGS = [("Hi!", "Hello! Would you like to hear a story?"),
             ("Hello.", "Hi there! I can tell you a story."),
             ("Hey there!", "Hello! What kind of story do you want?"),
             ("Good morning!", "Good morning! Shall I tell you a story?"),
             ("Hi, how are you?", "I am well, thank you! Do you want a story?")]
THANKS = [("Thank you!", "You are welcome! I hope you liked it."),
          ("Thanks, that was nice.", "You are welcome!"),
          ("Thank you so much!", "You are very welcome. Come back for another story soon!"),
          ("Thanks!", "Any time!")]
REPLY_PREFIXES = ("", "", "", "Sure! ", "Here is a story.\n\n", "Okay! ", "Of course. ")
# NOTE: a reply to a request naming a mood first restates it ("Here is a sad story about a
# dog."): a tiny model copies a word from the prompt easily (animals: 100%) but learned no
# mood from the request alone (50%, chance); once a mood word is in the story it keeps to it.
RESTATED_PREFIXES = ("Here is a {mood} story about {about}.\n\n", "Sure! Here is a {mood} story "
                     "about {about}.\n\n", "Okay, a {mood} story about {about}.\n\n",
                     "Of course. This is a {mood} story about {about}.\n\n")
# request phrasings by which attributes they name
REQUESTS = {
    ("animal", "mood"): [
        "Tell me a {mood} story about a {animal}.",
        "Can you tell me a {mood} story about a {animal}?",
        "Please write a {mood} story with a {animal} in it.",
        "I want a {mood} story about a {animal}.",
        "Tell me a story about a {animal}. Make it {mood}.",
        "Write a short {mood} story about a {animal}.", "A {mood} story about a {animal}, please.",
        "Could you tell me a story about a {animal}? It should be {mood}.",
    ],
    ("animal", "mood", "pet"): [
        "Tell me a {mood} story about a {animal} named {pet}.",
        "Write a {mood} story about a {animal} called {pet}.",
        "Can you tell me a {mood} story about {pet} the {animal}?",
    ],
    ("animal", "mood", "gender"): [
        "Tell me a {mood} story about a {gender} and a {animal}.",
        "Please tell me a {mood} story about a {gender} who meets a {animal}.",
        "I want a {mood} story with a {gender} and a {animal}.",
    ],
    ("animal", "mood", "name"): [
        "Tell me a {mood} story about {name} and a {animal}.",
        "Write a {mood} story where {name} meets a {animal}.",
    ],
    ("animal", "mood", "place"): [
        "Tell me a {mood} story about a {animal} at the {place}.",
        "Can you write a {mood} story about a {animal} in the {place}?",
    ],
    ("animal",): ["Tell me a story about a {animal}.", "Can you write a story about a {animal}?",
                  "I like {plural}. Tell me a story about one.",
                  "A story about a {animal}, please."],
    ("mood",): ["Tell me a {mood} story.", "Can you tell me a {mood} story?",
                "I want to hear a {mood} story.", "Write a short {mood} story."],
    ("gender",): ["Tell me a story about a {gender}.", "Write a story about a little {gender}."],
    ("weather", "animal"): ["Tell me a story about a {animal} on a {weather} day."],
    (): ["Tell me a story.", "Can you tell me a story?", "Please tell me a story.",
         "I want a story.", "Write me a short story.", "Story time! Tell me one."],
}
QUESTIONS = [
    (["What animal was in the story?", "Which animal was in the story?"],
     ["The animal was a {animal} named {pet}.", "It was a {animal} called {pet}."]),
    (["How did {name} feel?", "Was {name} happy or sad?", "How did the story end?"],
     ["{name} felt {mood}.", "{name} was {mood} at the end."]),
    (["Where did the story happen?", "Where did {name} go?"],
     ["At the {place}.", "{name} went to the {place}."]),
    (["What was the weather like?", "How was the weather?"], ["It was {weather}."]),
    (["Who was the story about?", "What was the name of the {gender_}?"],
     ["It was about a {gender} named {name}.", "The {gender} was called {name}."]),
]


def turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def reply_prefix(rng: random.Random, given: dict[str, str]) -> str:
    if "mood" not in given:
        return _pick(rng, REPLY_PREFIXES)
    about = f"a {given['animal']}" if "animal" in given else _pick(rng, ("a friend", "a day"))
    return _pick(rng, RESTATED_PREFIXES).format(mood=given["mood"], about=about)


def make_chat(rng: random.Random, mood_opening: bool = False) -> str:
    """A ChatML conversation: optional greeting, one or two story requests with answers and
    questions about the story just told, optional thanks. With mood_opening, a story answering a
    request that names a mood sets that mood in its first sentence."""
    parts = []
    if rng.random() < 0.3:
        user, reply = _pick(rng, GREETINGS)
        parts += [turn("user", user), turn("assistant", reply)]
    for _ in range(1 if rng.random() < 0.85 else 2):
        keys = _pick(rng, list(REQUESTS))
        # NOTE: requests naming animal and mood are over-weighted: what steering evaluation asks
        if rng.random() < 0.4:
            keys = ("animal", "mood")
        asked = {"animal": _pick(rng, ANIMALS), "mood": _pick(rng, MOODS),
                 "gender": _pick(rng, GENDERS), "pet": _pick(rng, ANIMAL_NAMES),
                 "place": _pick(rng, PLACES), "weather": _pick(rng, WEATHERS)}
        asked["name"] = _pick(rng, NAMES[asked["gender"]])
        given = {k: asked[k] for k in keys}
        if "name" in given:
            given["gender"] = asked["gender"]
        story = make_story(rng, **given, mood_opening=mood_opening and "mood" in given)
        request = _pick(rng, REQUESTS[keys]).format(**asked, plural=PLURALS[asked["animal"]])
        parts += [turn("user", request), turn("assistant", reply_prefix(rng, given) + story.text)]
        for _ in range(rng.choice((0, 0, 1, 1, 2))):
            questions, answers = _pick(rng, QUESTIONS)
            fields = {**story.__dict__, "gender_": story.gender}
            parts += [turn("user", _pick(rng, questions).format(**fields)),
                      turn("assistant", _pick(rng, answers).format(**fields))]
    if rng.random() < 0.4:
        user, reply = _pick(rng, THANKS)
        parts += [turn("user", user), turn("assistant", reply)]
    return "".join(parts)


def make_document(rng: random.Random, chat_share: float = 0.5, mood_opening: bool = False,
                  neutral_share: float = 0.0) -> str:
    """A chat (chat_share of documents) or a plain story; with neutral_share, that share of the
    plain stories is mood-free with a coin-flip closing (make_story's coin_closing)."""
    if rng.random() < chat_share:
        return make_chat(rng, mood_opening)
    # NOTE: the draw is made only when asked for, so documents without it are as before
    if neutral_share and rng.random() < neutral_share:
        return make_story(rng, neutral=True, coin_closing=True).text
    return make_story(rng).text


def generate(seed: int, n_docs: int, chat_share: float = 0.5, mood_opening: bool = False,
             neutral_share: float = 0.0) -> list[str]:
    rng = random.Random(seed)
    return [make_document(rng, chat_share, mood_opening, neutral_share) for _ in range(n_docs)]


def write(path: Path, docs: list[str]) -> None:
    """One JSON string per line: documents contain newlines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def read(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "train/build")
    write(out / "train.txt", generate(1, 40000))
    write(out / "heldout.txt", generate(2, 1000))
