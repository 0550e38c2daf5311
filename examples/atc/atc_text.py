"""Text side of the ATC example: radio phraseology generator and the general-English heldout sentences.

Transcripts are lowercase a-z words separated by single spaces; numbers are spelled digit by digit exactly
as synthesized ("flight level eight zero", "one two seven decimal three five", "niner"). `tts_text()` gives
the string fed to espeak-ng (respellings such as "ils" -> "I L S"); the transcript keeps the word.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

# --------------------------------------------------------------------------------------
# ATC phraseology generator
# --------------------------------------------------------------------------------------
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

PHONETIC = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
            "juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
            "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu"]

# ICAO telephony designators (transcribed as spoken words)
AIRLINES = ["lufthansa", "speedbird", "air france", "alitalia", "iberia", "swiss", "austrian",
            "scandinavian", "finnair", "turkish", "emirates", "qatari", "american", "united",
            "delta", "air canada", "aeroflot", "shamrock", "easy", "ryanair", "condor",
            "eurowings", "edelweiss", "transavia", "cargolux", "sunexpress", "norshuttle",
            "hansaline", "germanwings", "jetblue", "singapore", "cathay", "air china", "fedex",
            "beeline", "air portugal", "wizz air", "virgin", "aegean", "olympic", "croatia",
            "luxair", "springbok", "saudia", "kuwaiti", "qantas", "midland", "tarom"]

# (name, unit) -- ACC / approach / aerodrome units
STATIONS = [("rhein", "radar"), ("langen", "radar"), ("maastricht", "radar"), ("bremen", "radar"),
            ("munich", "radar"), ("munich", "approach"), ("frankfurt", "director"),
            ("frankfurt", "tower"), ("london", "control"), ("scottish", "control"),
            ("reims", "control"), ("paris", "control"), ("geneva", "radar"), ("zurich", "arrival"),
            ("vienna", "radar"), ("brussels", "control"), ("amsterdam", "approach"),
            ("padova", "control"), ("milano", "radar"), ("shannon", "control"),
            ("copenhagen", "control"), ("praha", "radar"), ("hannover", "radar"),
            ("dusseldorf", "approach"), ("berlin", "director"), ("stuttgart", "ground"),
            ("hamburg", "tower"), ("manchester", "approach"), ("dublin", "control"),
            ("brest", "control")]

GA_PREFIX = [["delta"], ["golf"], ["foxtrot"], ["hotel", "bravo"], ["oscar", "echo"],
             ["papa", "hotel"], ["echo", "india"], ["sierra", "echo"], ["oscar", "kilo"]]

FAREWELL = ["good bye", "bye bye", "good day", "bye", "thank you", "cheerio", "ciao"]
GREETING = ["good morning", "good afternoon", "good evening", "hello", "good day", "servus"]

# Respellings applied only to the text fed to the TTS engines (transcript keeps the word).
TTS_RESPELL = {
    "ils": "I L S", "qnh": "Q N H", "rhein": "rhine", "reims": "reems", "zurich": "zurick",
    "maastricht": "maastrikt", "speedbird": "speed bird", "finnair": "finn air",
    "ryanair": "ryan air", "eurowings": "euro wings", "germanwings": "german wings",
    "hansaline": "hansa line", "jetblue": "jet blue", "fedex": "fed ex",
    "sunexpress": "sun express", "norshuttle": "nor shuttle", "cargolux": "cargo lux",
    "luxair": "lux air", "beeline": "bee line", "juliett": "juliet", "xray": "x-ray",
    "wilco": "wil co", "praha": "prahha", "padova": "pahdova", "servus": "sairvoos",
    "ciao": "chow", "cheerio": "cheery oh", "qatari": "katari", "saudia": "saudeea",
}

_CONS = "bdfgklmnprstvz"
_VOW = "aeiou"
_CLUSTERS = ["nd", "mb", "rt", "lk", "ns", "rn", "lt", "st", "nk", "rd", "mp", "rm", "nt", "sk"]


def make_waypoints(rng: random.Random, n: int, banned: set[str]) -> list[str]:
    """Invented pronounceable 5-letter reporting points (CVCVC or CVCCV)."""
    out: list[str] = []
    seen = set(banned)
    while len(out) < n:
        if rng.random() < 0.65:
            w = rng.choice(_CONS) + rng.choice(_VOW) + rng.choice(_CONS) + rng.choice(_VOW) + rng.choice(_CONS)
        else:
            w = rng.choice(_CONS) + rng.choice(_VOW) + rng.choice(_CLUSTERS) + rng.choice(_VOW)
        if w in seen or re.search(r"(.)\1", w):
            continue
        seen.add(w)
        out.append(w)
    return out


class ATCGenerator:
    """Random ATC transmissions (controller instructions, pilot read-backs, initial calls) from one rng."""

    def __init__(self, rng: random.Random, waypoints: list[str]):
        self.rng = rng
        self.waypoints = waypoints
        self.niner = True
        self.decimal = "decimal"

    # --- spoken numbers ---------------------------------------------------------------
    def d(self, ch: str) -> str:
        if ch == "9":
            return "niner" if self.niner else "nine"
        return DIGITS[int(ch)]

    def digits(self, s) -> str:
        return " ".join(self.d(c) for c in str(s))

    def flight_level(self) -> str:
        r = self.rng
        fl = r.choice(list(range(60, 200, 10)) + list(range(200, 420, 10)) + [75, 95, 115, 125, 145, 165, 245, 255])
        if fl % 100 == 0 and r.random() < 0.4:
            return f"{DIGITS[fl // 100]} hundred"
        return self.digits(fl)

    def altitude(self) -> str:
        r = self.rng
        th = r.randint(2, 13)
        s = f"{self.digits(th)} thousand"
        if th < 10 and r.random() < 0.3:
            s += f" {self.d(str(r.randint(1, 9)))} hundred"
        return s + " feet"

    def heading(self) -> str:
        h = self.rng.choice(range(10, 361, 5 if self.rng.random() < 0.3 else 10))
        return self.digits(f"{h:03d}")

    def speed(self) -> str:
        return self.digits(self.rng.choice(range(160, 330, 10 if self.rng.random() < 0.8 else 5)))

    def mach(self) -> str:
        return f"mach {self.decimal} {self.digits(self.rng.randint(70, 84))}"

    def freq(self) -> str:
        r = self.rng
        mhz = r.randint(118, 136)
        if r.random() < 0.6:
            khz = r.choice(range(0, 1000, 25))
        else:
            khz = r.choice(range(0, 1000, 25)) + r.choice([5, 10, 15])
        ks = f"{khz:03d}".rstrip("0") or "0"
        return f"{self.digits(mhz)} {self.decimal} {self.digits(ks)}"

    def squawk(self) -> str:
        while True:
            code = "".join(str(self.rng.randint(0, 7)) for _ in range(4))
            if code not in ("7500", "7600", "7700", "2000", "7000", "1200", "0000"):
                return self.digits(code)

    def qnh(self) -> str:
        r = self.rng
        if r.random() < 0.8:
            return f"qnh {self.digits(r.randint(985, 1035))}"
        return f"altimeter {self.digits(r.randint(2930, 3045) if r.random() < 0.5 else r.randint(2950, 3010))}"

    def runway(self) -> str:
        r = self.rng
        n = r.randint(1, 36)
        s = self.digits(f"{n:02d}")
        if r.random() < 0.45:
            s += " " + r.choice(["left", "right", "center"])
        return s

    def wind(self) -> str:
        r = self.rng
        if r.random() < 0.08:
            return "wind calm"
        return f"wind {self.digits(f'{r.choice(range(10, 361, 10)):03d}')} degrees {self.digits(r.randint(3, 28))} knots"

    def taxiway(self) -> str:
        s = self.rng.choice(PHONETIC[:14])
        if self.rng.random() < 0.5:
            s += " " + DIGITS[self.rng.randint(1, 9)]
        return s

    def wpt(self) -> str:
        return self.rng.choice(self.waypoints)

    def station(self, with_unit=True) -> str:
        name, unit = self.rng.choice(STATIONS)
        return f"{name} {unit}" if with_unit else name

    # --- callsigns -----------------------------------------------------------------------
    def callsign(self) -> str:
        r = self.rng
        x = r.random()
        if x < 0.82:
            airline = r.choice(AIRLINES)
            nd = r.choices([1, 2, 3, 4], weights=[1, 3, 5, 4])[0]
            num = str(r.randint(1, 9)) + "".join(str(r.randint(0, 9)) for _ in range(nd - 1))
            s = f"{airline} {self.digits(num)}"
            if r.random() < 0.25:
                s += " " + " ".join(r.choice(PHONETIC) for _ in range(r.choice([1, 1, 2])))
            return s
        if x < 0.93:  # European general aviation registration, full or abbreviated
            pre = r.choice(GA_PREFIX)
            tail = [r.choice(PHONETIC) for _ in range(5 - len(pre) if len(pre) == 1 else 3)]
            if r.random() < 0.35:
                return " ".join(pre[:1] + tail[-2:])
            return " ".join(pre + tail)
        # US style November registration
        num = str(r.randint(1, 9)) + "".join(str(r.randint(0, 9)) for _ in range(r.randint(1, 3)))
        tail = " ".join(r.choice(PHONETIC) for _ in range(r.randint(0, 2)))
        return ("november " + self.digits(num) + (" " + tail if tail else "")).strip()

    # --- clauses: each returns (controller_text, pilot_readback_text) ----------------------
    def c_level(self):
        r = self.rng
        fl = self.flight_level()
        x = r.random()
        if x < 0.22:
            return f"descend flight level {fl}", r.choice([f"descend flight level {fl}", f"descending flight level {fl}", f"down to flight level {fl}"])
        if x < 0.40:
            return f"climb flight level {fl}", r.choice([f"climb flight level {fl}", f"climbing flight level {fl}", f"up to flight level {fl}"])
        if x < 0.52:
            v = r.choice(["descend", "climb"])
            return f"{v} to flight level {fl}", f"{v} to flight level {fl}"
        if x < 0.62:
            return f"maintain flight level {fl}", f"maintain flight level {fl}"
        if x < 0.72:
            alt = self.altitude()
            q = self.qnh()
            return f"descend to altitude {alt} {q}", f"descend altitude {alt} {q}"
        if x < 0.78:
            return f"stop descent at flight level {fl}", f"stop descent flight level {fl}"
        if x < 0.84:
            rate = r.choice(["one thousand", "one thousand five hundred", "two thousand", "two thousand five hundred"])
            v = r.choice(["descend", "climb"])
            return (f"{v} flight level {fl} rate {rate} feet per minute or {r.choice(['more', 'greater'])}",
                    f"{v} flight level {fl} rate {rate} or more")
        if x < 0.91:
            w = self.wpt()
            return (f"descend to reach flight level {fl} at {w}", f"flight level {fl} at {w}")
        return f"report passing flight level {fl}", "wilco"

    def c_heading(self):
        r = self.rng
        h = self.heading()
        x = r.random()
        if x < 0.55:
            side = r.choice(["left", "right"])
            return f"turn {side} heading {h}", r.choice([f"{side} heading {h}", f"turn {side} heading {h}", f"heading {h}"])
        if x < 0.72:
            return f"fly heading {h}", f"heading {h}"
        if x < 0.80:
            return "continue present heading", "present heading"
        if x < 0.90:
            side = r.choice(["left", "right"])
            deg = self.digits(r.choice([10, 15, 20, 30]))
            return f"turn {side} by {deg} degrees", f"{side} by {deg} degrees"
        return f"continue heading {h} vectoring for ils approach runway {self.runway()}", f"heading {h}"

    def c_speed(self):
        r = self.rng
        s = self.speed()
        x = r.random()
        if x < 0.30:
            return f"reduce speed {s} knots", f"speed {s} knots"
        if x < 0.45:
            return f"reduce speed to {s} knots", f"reducing {s} knots"
        if x < 0.58:
            return f"maintain {s} knots or greater", f"{s} knots or greater"
        if x < 0.72:
            m = self.mach()
            return f"maintain {m}", m
        if x < 0.80:
            return f"increase speed {s} knots", f"increase {s} knots"
        if x < 0.90:
            return "no speed restrictions", "no speed restrictions"
        return "resume normal speed", "normal speed"

    def c_direct(self):
        r = self.rng
        w = self.wpt()
        x = r.random()
        if x < 0.35:
            return f"proceed direct {w}", f"direct {w}"
        if x < 0.55:
            return f"direct {w}", f"direct {w}"
        if x < 0.68:
            return f"resume own navigation direct {w}", f"own navigation direct {w}"
        if x < 0.80:
            w2 = self.wpt()
            return f"after {w} proceed direct {w2}", f"after {w} direct {w2}"
        if x < 0.90:
            arr = f"{w} {DIGITS[r.randint(1, 9)]} {r.choice(PHONETIC[:6])}"
            return f"cleared {arr} arrival", f"cleared {arr} arrival"
        return f"cleared direct {w}", f"direct {w}"

    def c_contact(self):
        r = self.rng
        st, f = self.station(), self.freq()
        bye = (" " + r.choice(FAREWELL)) if r.random() < 0.5 else ""
        x = r.random()
        if x < 0.6:
            return f"contact {st} {f}{bye}", f"{f}{bye}" if r.random() < 0.6 else f"contact {st} {f}{bye}"
        if x < 0.8:
            return f"contact {st} on {f}{bye}", f"{f}{bye}"
        return f"monitor {st} {f}", f"monitor {f}"

    def c_squawk(self):
        r = self.rng
        if r.random() < 0.85:
            s = self.squawk()
            return f"squawk {s}", r.choice([f"squawk {s}", s])
        return "squawk ident", "squawk ident"

    def c_runway(self):
        r = self.rng
        rw = self.runway()
        x = r.random()
        if x < 0.30:
            return f"cleared ils approach runway {rw}", f"cleared ils approach runway {rw}"
        if x < 0.45:
            return f"expect ils approach runway {rw}", f"expect ils runway {rw}"
        if x < 0.58:
            return f"cleared to land runway {rw} {self.wind()}", f"cleared to land runway {rw}"
        if x < 0.68:
            return f"{self.wind()} runway {rw} cleared for takeoff", f"cleared for takeoff runway {rw}"
        if x < 0.78:
            return f"line up and wait runway {rw}", f"line up and wait runway {rw}"
        if x < 0.86:
            return f"vacate via {self.taxiway()}", "wilco"
        if x < 0.94:
            return f"taxi to holding point runway {rw} via {self.taxiway()}", f"holding point runway {rw}"
        return f"report established on the localizer runway {rw}", "wilco"

    def c_info(self):
        r = self.rng
        x = r.random()
        if x < 0.2:
            return "radar contact", "roger"
        if x < 0.3:
            return "identified", "roger"
        if x < 0.45:
            return self.qnh(), self.qnh()
        if x < 0.55:
            return f"information {r.choice(PHONETIC)} is current {self.qnh()}", "roger"
        if x < 0.70:
            return (f"traffic opposite direction flight level {self.flight_level()}",
                    r.choice(["looking out", "traffic in sight", "negative contact"]))
        if x < 0.80:
            return "report your heading", f"heading {self.heading()}"
        if x < 0.90:
            return "expect vectors for ils approach", "roger"
        return f"say again your flight level", f"flight level {self.flight_level()}"

    CLAUSES = [("c_level", 5), ("c_heading", 4), ("c_speed", 3), ("c_direct", 3), ("c_contact", 3),
               ("c_squawk", 2), ("c_runway", 2), ("c_info", 2)]

    def clauses(self, k: int):
        names = [n for n, _ in self.CLAUSES]
        wts = [w for _, w in self.CLAUSES]
        picked: list[str] = []
        while len(picked) < k:
            n = self.rng.choices(names, weights=wts)[0]
            if n not in picked:
                picked.append(n)
        if "c_runway" in picked:  # aerodrome clauses do not mix with en-route ones
            picked = [n for n in picked if n not in ("c_info", "c_direct", "c_squawk", "c_level")]
        # put contact last (radio convention)
        picked.sort(key=lambda n: n == "c_contact")
        return [getattr(self, n)() for n in picked]

    def utterance(self) -> list[str]:
        """Returns a list of phrase chunks; transcript = ' '.join(chunks)."""
        r = self.rng
        self.niner = r.random() < 0.75
        self.decimal = "decimal" if r.random() < 0.85 else "point"
        cs = self.callsign()
        k = r.choices([1, 2, 3], weights=[45, 40, 15])[0]
        role = r.random()
        if role < 0.62:  # controller instruction
            cl = [c for c, _ in self.clauses(k)]
            chunks = [cs]
            if r.random() < 0.12:
                chunks.append(r.choice(GREETING))
            for i, c in enumerate(cl):
                chunks.append(("and " + c) if i > 0 and r.random() < 0.3 else c)
            return chunks
        if role < 0.86:  # pilot readback
            rb = [p for _, p in self.clauses(k)]
            if r.random() < 0.75:
                return rb + [cs]
            return [cs] + rb
        x = r.random()  # pilot initial call / request
        if x < 0.35:
            st = self.station()
            chunks = [st, r.choice(GREETING), cs] if r.random() < 0.6 else [st, cs, r.choice(GREETING)]
            tail = r.choice([f"passing flight level {self.flight_level()} climbing flight level {self.flight_level()}",
                             f"flight level {self.flight_level()}",
                             f"descending flight level {self.flight_level()} direct {self.wpt()}",
                             f"climbing flight level {self.flight_level()} heading {self.heading()}",
                             f"maintaining flight level {self.flight_level()} squawking {self.squawk()}"])
            return chunks + [tail]
        if x < 0.55:
            return [cs, r.choice(["request descent", "request higher", "request lower", "request climb",
                                  f"request direct {self.wpt()}", f"request flight level {self.flight_level()}",
                                  "ready for departure", "ready to copy"])]
        if x < 0.70:
            return [r.choice(["wilco", "roger", "affirm", "negative", "say again", "standby", "unable"]), cs] if r.random() < 0.5 \
                else [cs, r.choice(["wilco", "roger", "affirm", "negative", "say again", "standby", "unable"])]
        if x < 0.85:
            return [cs, f"confirm {r.choice(['flight level ' + self.flight_level(), 'heading ' + self.heading(), 'direct ' + self.wpt(), 'squawk ' + self.squawk()])}"]
        return [cs, f"information {r.choice(PHONETIC)} received", self.qnh()]

# distinctive ATC vocabulary that must not appear in the heldout sentences
ATC_ONLY_WORDS = set(DIGITS) | set(PHONETIC) | {
    "niner", "flight", "level", "heading", "runway", "squawk", "cleared", "clear", "descend",
    "climb", "approach", "tower", "radar", "control", "knots", "wilco", "roger", "maintain",
    "contact", "frequency", "decimal", "qnh", "ils", "taxiway", "takeoff", "vacate", "proceed",
    "direct", "traffic", "altitude", "feet", "thousand", "hundred", "left", "right", "turn",
    "speed", "mach", "wind", "report", "expect", "information", "continue", "monitor", "standby",
    "affirm", "negative", "confirm", "request", "ready", "ident", "vectors", "final", "passing",
    "leaving", "localizer", "airport", "aircraft", "plane", "pilot", "altimeter", "degrees",
    "arrival", "departure", "ground", "director", "navigation", "established", "holding",
}


def text_norm(s: str) -> str:
    """Sentence -> transcript convention: lowercase a-z words, hyphens and apostrophes removed."""
    s = s.lower().replace("-", "")
    s = re.sub(r"[^a-z' ]+", " ", s).replace("'", "")
    return re.sub(r"\s+", " ", s).strip()


def tts_text(transcript_chunks: list[str], rng: random.Random) -> str:
    """The string fed to espeak-ng for one utterance: respelled words, sometimes a pause between chunks."""
    parts = []
    for c in transcript_chunks:
        parts.append(" ".join(TTS_RESPELL.get(w, w) for w in c.split()))
    # short pauses between radio phrase chunks (callsign / instruction) on some utterances
    sep = ", " if rng.random() < 0.6 else " "
    return sep.join(parts)


def heldout_sentences() -> list[str]:
    """The clean general-English sentences (no ATC vocabulary), deduplicated, in file order."""
    path = Path(__file__).with_name("heldout_sentences.txt")
    lines = [s.strip() for s in path.read_text().splitlines() if s.strip()]
    return list(dict.fromkeys(lines))
