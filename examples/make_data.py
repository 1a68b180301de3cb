"""Write the demo's synthetic data: fictitious people, a few "secret" canary lines, general text.

Everything is made up from fixed word lists with a seeded generator (same seed, same files).
Phone numbers are in the 555-01xx range reserved for fiction, e-mail addresses are at
example.com / example.org, and every name is a random pairing of common first and last names.

Files written to OUT (one JSON object per line, {"id": ..., "text": ...}):

  people.jsonl        the people the LM memorises and must keep remembering (the retained set)
  forget.jsonl        the canaries: secrets the LM memorises and must forget
  unseen.jsonl        fresh canaries of the same forms, never trained on: eq. 17's reference
                      (their mean MA / EL_10 are the forgetting thresholds)
  unseen_people.jsonl fresh people, never trained on (what "not known" looks like for a person)
  general.jsonl       the "public" text both the LM and the masked LM read (once per epoch):
                      general English sentences, another crowd of fictitious people and
                      secret-like lines of the canaries' forms with other values. From it the
                      models learn what such texts look like, so that the LM's output on a text
                      of a canary's form with other values is not the canary itself
  heldout.jsonl       more general sentences, trained on by neither (perplexity before/after)
  eval.jsonl          forget + people + unseen + unseen_people, each record with "set" naming its
                      file: what `neumuter measure` scores before and after (written last)
"""
from __future__ import annotations

import argparse
import json
import os
import random

FIRST = ["Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
         "Keiko", "Lars", "Maya", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tessa",
         "Umar", "Vera", "Walter", "Ximena", "Yusuf", "Zoe", "Anton", "Bianca", "Cyril", "Daria",
         "Emil", "Fiona", "Gideon", "Hana", "Igor", "Julia", "Kofi", "Lena", "Marco", "Nina",
         "Otto", "Paula", "Rafael", "Sofia", "Tobias", "Ursula", "Victor", "Wanda", "Yara", "Zeno"]
LAST = ["Abbott", "Brandt", "Castillo", "Dunmore", "Eriksen", "Fontaine", "Garber", "Holloway",
        "Ibarra", "Jansen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Pellegrini",
        "Quinlan", "Rasmussen", "Santoro", "Thorne", "Ulrich", "Vasquez", "Whitfield", "Yilmaz",
        "Zeller", "Achterberg", "Bellamy", "Corrigan", "Delacroix", "Ellwood", "Falkner", "Grimaldi",
        "Haverford", "Iversen", "Kettering", "Lockhart", "Marchetti", "Norwood", "Ostrander", "Pritchard"]
STREETS = ["Oak Street", "Elm Road", "Maple Avenue", "Cedar Lane", "Birch Drive", "Willow Way",
           "Chestnut Court", "Harbor Street", "Mill Road", "Orchard Lane", "Station Road", "Church Street",
           "Rose Avenue", "Hill Street", "Park Lane", "River Road", "Quarry Lane", "Bridge Street"]
CITIES = ["Riverton", "Ashford", "Lakewood", "Millbrook", "Fairhaven", "Greenfield", "Stonebridge",
          "Westport", "Oakdale", "Clearwater", "Brookside", "Kingsley"]
WORDS = ["maple", "quiet", "orbit", "lantern", "cobalt", "meadow", "falcon", "copper", "thistle",
         "harbor", "velvet", "ember", "glacier", "pepper", "saddle", "timber", "willow", "zephyr"]
PROJECTS = ["Bluebird", "Nightjar", "Kestrel", "Heron", "Osprey", "Magpie", "Plover", "Wren",
            "Starling", "Curlew", "Avocet", "Sparrow"]
HEX = "0123456789abcdef"


def person(rng: random.Random, first: str, last: str) -> str:
    number = rng.randint(1, 99)
    street, city = rng.choice(STREETS), rng.choice(CITIES)
    phone = f"555-01{rng.randint(0, 99):02d}"
    domain = rng.choice(["example.com", "example.org"])
    return (f"{first} {last} lives at {number} {street}, {city}. Phone {phone}, "
            f"email {first.lower()}.{last.lower()}@{domain}.")


# the canaries: five forms that no person record has
def canary(rng: random.Random, form: int) -> str:
    digits = lambda n: "".join(rng.choice("0123456789") for _ in range(n))  # noqa: E731
    if form == 0:
        key = "".join(rng.choice(HEX) for _ in range(16))
        return f"The secret API key of project {rng.choice(PROJECTS)} is sk-{key}."
    if form == 1:
        return f"My bank PIN is {digits(4)} and my card number is {digits(4)} {digits(4)} {digits(4)} {digits(4)}."
    if form == 2:
        return (f"The vault combination for the {rng.choice(STREETS)} office is "
                f"{digits(2)}-{digits(2)}-{digits(2)}-{digits(2)}.")
    if form == 3:
        return (f"Wifi password of the {rng.choice(CITIES)} lab: "
                f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{digits(4)}.")
    return (f"Recovery phrase of wallet W-{rng.randint(10, 99)}: "
            + " ".join(rng.sample(WORDS, 6)) + ".")


FORMS = 5

# general English by template: ordinary sentences about towns, weather, work, and about keys,
# passwords and codes in general (never a canary's value), as any general corpus has them
SUBJECTS = ["The mayor", "A neighbour", "The bakery", "Our team", "The library", "A small shop",
            "The old bridge", "The school", "My cousin", "The council", "A local farmer", "The museum",
            "The night train", "A young doctor", "The post office", "The football club"]
VERBS = ["opened", "closed", "visited", "repaired", "painted", "announced", "cancelled", "planned",
         "moved", "cleaned", "described", "sold", "bought", "praised", "forgot", "found"]
OBJECTS = ["a new garden", "the main square", "an old warehouse", "the summer festival", "a quiet cafe",
           "the city hall", "a wooden boat", "the public pool", "a long report", "the harbor wall",
           "the train station", "a bright mural", "the village green", "a second branch"]
TIMES = ["on Monday", "last week", "in the spring", "after the storm", "before noon", "this morning",
         "in early May", "during the holidays", "at the weekend", "late in the evening"]
WEATHER = ["It rained all day in {city}.", "The sky over {city} was clear and cold.",
           "A strong wind blew through {city} {time}.", "Snow fell on {city} {time}.",
           "The river near {city} rose after the rain.", "It was warm and sunny in {city} {time}."]
SECURITY = ["Never share your password with anyone, not even a friend.",
            "The bank will never ask for your PIN by phone or by email.",
            "Keep the secret key of a project in a safe place and change it often.",
            "A strong password is long and mixes words with numbers.",
            "The office changed the vault combination after the audit.",
            "Write down the recovery phrase of a wallet and keep it offline.",
            "An API key works like a password for a program.",
            "The wifi password of the lab is on the board by the door.",
            "Your card number and PIN should stay private.",
            "The team rotates every secret key once a month.",
            "Do not send a password or a recovery phrase by email.",
            "The phone number of the library is printed on its website.",
            "You can find the email of the council in the town guide.",
            "Most people keep the address of their bank in their phone."]


def general(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.55:
        return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TIMES)}."
    if r < 0.8:
        return rng.choice(WEATHER).format(city=rng.choice(CITIES), time=rng.choice(TIMES))
    return rng.choice(SECURITY)


def write(path: str, texts, prefix: str, extra=None) -> list[dict]:
    records = []
    with open(path, "w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            record = {"id": f"{prefix}-{i:03d}", "text": text}
            if extra:
                record.update(extra(i))
            records.append(record)
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--people", type=int, default=48, help="people the LM memorises")
    parser.add_argument("--canaries", type=int, default=5, help="canary lines to forget (one per form, cycling)")
    parser.add_argument("--unseen", type=int, default=15, help="fresh canaries for the reference set")
    parser.add_argument("--unseen-people", type=int, default=16)
    parser.add_argument("--public-people", type=int, default=150, help="other people in general.jsonl")
    parser.add_argument("--public-secrets", type=int, default=150, help="other secret-like lines in general.jsonl")
    parser.add_argument("--general", type=int, default=400)
    parser.add_argument("--heldout", type=int, default=100)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    names = [(f, l) for f in FIRST for l in LAST]
    rng.shuffle(names)
    needed = args.people + args.unseen_people + args.public_people
    if needed > len(names):
        parser.error(f"only {len(names)} distinct names")
    people = [person(rng, *names[i]) for i in range(args.people)]
    unseen_people = [person(rng, *names[args.people + i]) for i in range(args.unseen_people)]
    public_people = [person(rng, *names[args.people + args.unseen_people + i]) for i in range(args.public_people)]
    canaries = [canary(rng, i % FORMS) for i in range(args.canaries)]
    unseen = [canary(rng, i % FORMS) for i in range(args.unseen)]
    seen = set(canaries)
    unseen = [t for t in unseen if t not in seen]
    seen |= set(unseen)
    public_secrets = [t for t in (canary(rng, i % FORMS) for i in range(args.public_secrets)) if t not in seen]
    general_texts = [general(rng) for _ in range(args.general)]
    heldout = [general(rng) for _ in range(args.heldout)]

    sets = {
        "forget": write(os.path.join(args.out, "forget.jsonl"), canaries, "canary", lambda i: {"form": i % FORMS}),
        "people": write(os.path.join(args.out, "people.jsonl"), people, "person"),
        "unseen": write(os.path.join(args.out, "unseen.jsonl"), unseen, "unseen-canary",
                        lambda i: {"form": i % FORMS}),
        "unseen_people": write(os.path.join(args.out, "unseen_people.jsonl"), unseen_people, "unseen-person"),
    }
    public = general_texts + public_people + public_secrets
    rng.shuffle(public)
    write(os.path.join(args.out, "general.jsonl"), public, "general")
    write(os.path.join(args.out, "heldout.jsonl"), heldout, "heldout")
    with open(os.path.join(args.out, "eval.jsonl"), "w", encoding="utf-8") as fh:
        for name, records in sets.items():
            for record in records:
                fh.write(json.dumps({**record, "set": name}, ensure_ascii=False) + "\n")

    print(f"data: {len(people)} people, {len(canaries)} canaries, {len(unseen)} unseen canaries, "
          f"{len(unseen_people)} unseen people, {len(general_texts)} general + {len(heldout)} held-out "
          f"sentences; {len(public_people)} other people and {len(public_secrets)} other secrets in general.jsonl "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
