"""Speech with known mouth truth: random sentences spoken by espeak-ng, phoneme timings → visemes →
per-frame mouth tracks.

espeak-ng is driven through its C library (`libespeak-ng.so.1`, Debian package `espeak-ng`) rather than
the command line because only the library reports phoneme events with sample positions for the
built-in voices (`--pho` needs MBROLA voices); it runs in a fresh helper process per clip (see
`EspeakSession`) so that the same clip always sounds the same. Each phoneme maps to a viseme, a target mouth shape
(opening, width, rounding); the targets are sampled at 1 ms, smoothed by a short Gaussian
(coarticulation: lips move towards the next sound before it starts) and averaged into video frames.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass

import numpy as np

from flashhead.errors import AudioError, ConfigError

SAMPLE_RATE = 16000

# ---------------------------------------------------------------- visemes

# (opening, width, rounding) in [0, 1]: opening 1 = jaw fully dropped, width 1 = lips spread wide.
VISEMES: dict[str, tuple[float, float, float]] = {
    "sil": (0.00, 0.50, 0.00),
    "PP": (0.00, 0.45, 0.10),  # p b m: lips pressed together
    "FF": (0.06, 0.50, 0.00),  # f v: lower lip to upper teeth
    "TH": (0.22, 0.55, 0.00),
    "DD": (0.24, 0.55, 0.00),  # t d n l
    "KK": (0.32, 0.55, 0.00),  # k g ŋ h x
    "CH": (0.20, 0.42, 0.60),  # ʃ ʒ tʃ dʒ
    "SS": (0.12, 0.65, 0.00),  # s z
    "RR": (0.24, 0.42, 0.50),
    "AA": (0.95, 0.60, 0.00),
    "EE": (0.58, 0.70, 0.00),  # e ɛ ə ɜ
    "IH": (0.30, 0.85, 0.00),  # i ɪ j
    "OH": (0.72, 0.35, 0.75),
    "OU": (0.28, 0.20, 1.00),  # u ʊ w y
}

# espeak-ng phoneme mnemonics (ASCII, Kirshenbaum-like); vowels by letter, consonants by letter or pair.
_VOWELS = {
    **dict.fromkeys("aA&V", "AA"),
    **dict.fromkeys("eE3@", "EE"),
    **dict.fromkeys("iI", "IH"),
    **dict.fromkeys("oO0", "OH"),
    **dict.fromkeys("uUyYW", "OU"),
}
_PAIRS = {"tS": "CH", "dZ": "CH", "ts": "SS", "dz": "SS"}
_CONSONANTS = {
    **dict.fromkeys("pbm", "PP"),
    **dict.fromkeys("fv", "FF"),
    **dict.fromkeys("TD", "TH"),
    **dict.fromkeys("tdnlLJ", "DD"),
    **dict.fromkeys("kgNxXhqGC", "KK"),
    **dict.fromkeys("SZ", "CH"),
    **dict.fromkeys("sz", "SS"),
    **dict.fromkeys("rR", "RR"),
    "w": "OU",
    "j": "IH",
}


@dataclass(frozen=True)
class Phone:
    """One phoneme (espeak-ng mnemonic) and its time span in seconds."""

    symbol: str
    start: float
    end: float


def phoneme_visemes(symbol: str) -> list[str]:
    """The viseme sequence of one espeak-ng phoneme: two for a diphthong ("aI" → AA, IH), else one."""
    if not symbol or symbol.startswith("_"):
        return ["sil"]
    core = "".join(ch for ch in symbol if ch not in "',:;#!^-=|%")
    if not core:
        return ["sil"]
    if core[:2] in _PAIRS:
        return [_PAIRS[core[:2]]]
    if core[0] in _VOWELS:
        vowels = [_VOWELS[ch] for ch in core if ch in _VOWELS]
        return vowels[:2] if len(vowels) > 1 and vowels[0] != vowels[1] else vowels[:1]
    # Unknown letters (language-specific symbols) get a neutral, slightly open shape.
    return [_CONSONANTS.get(core[0], "DD")]


@dataclass
class MouthTracks:
    """Per-frame mouth shape: opening, width and rounding, each (T,) float32 in [0, 1]."""

    open: np.ndarray
    width: np.ndarray
    round: np.ndarray


def mouth_tracks(
    phones: list[Phone],
    num_frames: int,
    fps: float = 25.0,
    *,
    coarticulation_ms: float = 22.0,
    articulation: float = 1.0,
) -> MouthTracks:
    """Phoneme spans → per-frame mouth tracks.

    `coarticulation_ms` is the Gaussian sigma that blends neighbouring visemes; `articulation` scales
    the opening (some speakers barely open their mouth). Time outside every phone is silence.
    """
    if num_frames < 1:
        raise ConfigError(f"num_frames must be >= 1, got {num_frames}")
    rate = 1000  # 1 ms grid: shorter than any phoneme, so spans never vanish
    n = int(np.ceil(num_frames / fps * rate))
    targets = np.tile(np.array(VISEMES["sil"], np.float64), (n, 1))
    for phone in phones:
        a, b = int(round(phone.start * rate)), int(round(phone.end * rate))
        a, b = max(a, 0), min(b, n)
        if b <= a:
            continue
        visemes = phoneme_visemes(phone.symbol)
        # A diphthong spends 60% of its span on the first vowel.
        cuts = [a, b] if len(visemes) == 1 else [a, a + int(0.6 * (b - a)), b]
        for v, lo, hi in zip(visemes, cuts[:-1], cuts[1:], strict=True):
            targets[lo:hi] = VISEMES[v]
    targets[:, 0] *= articulation
    smooth = _gaussian_smooth(targets, coarticulation_ms * rate / 1000.0)
    edges = np.round(np.arange(num_frames + 1) * rate / fps).astype(int)
    per_frame = np.add.reduceat(smooth, edges[:-1], axis=0) / np.diff(edges)[:, None]
    per_frame = np.clip(per_frame, 0.0, 1.0).astype(np.float32)
    # Gaussian tails never reach exactly zero; a closed mouth should be exactly closed.
    per_frame[per_frame[:, 0] < 0.01, 0] = 0.0
    return MouthTracks(per_frame[:, 0], per_frame[:, 1], per_frame[:, 2])


def _gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(3 * sigma) + 1
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(x, ((radius, radius), (0, 0)), mode="edge")
    return np.stack([np.convolve(padded[:, c], k, mode="valid") for c in range(x.shape[1])], axis=1)


# ---------------------------------------------------------------- sentences

_EN = {
    "name": "Anna Ben Clara David Emma Felix Grace Henry Iris Jack Laura Max Nora Oscar Paula Sam Tom Vera Will Zoe",
    "noun": "apple garden river window teacher doctor morning evening bottle market village mountain letter "
    "kitchen bridge island picture machine engine pocket blanket basket bicycle candle forest harbour jacket "
    "ladder mirror needle orange parrot rabbit saddle ticket tunnel valley wagon pebble puzzle camera guitar "
    "lemon meadow museum number ocean planet question rocket school sister summer table tiger umbrella voice "
    "weather yellow zebra baby coffee dinner music paper silver story thunder water city family friend",
    "verb": "finds carries paints opens closes watches follows borrows cleans builds catches cooks draws drops "
    "fixes grabs helps hides kicks lifts moves pulls pushes reads shares sells shows takes throws wants "
    "washes brings chooses covers keeps loves needs packs plays touches visits wraps",
    "adj": "big small quiet loud happy sleepy bright dark warm cold old new heavy light purple golden funny "
    "gentle clever brave quick slow shiny dusty tiny huge smooth rough sweet bitter careful lucky",
    "adv": "slowly quickly quietly happily carefully gently suddenly rarely often always never today "
    "tomorrow again together almost",
    "place": "in the kitchen|near the river|at the market|under the bridge|behind the house|on the island|"
    "after dinner|before school|in the morning|at night|by the window|across the valley",
}
_TEMPLATES_EN = [
    "{name} {verb} the {adj} {noun}.",
    "The {adj} {noun} {verb} a {noun} {place}.",
    "{name} {adv} {verb} the {noun} {place}.",
    "Why does {name} want a {adj} {noun}?",
    "My {noun} is {adj}, but the {noun} is {adj}.",
    "{name} and {name} {adv} share a {adj} {noun}.",
    "Please bring the {adj} {noun} {place}, {name}.",
    "Every {noun} {verb} a {adj} {noun} {adv}.",
]
# Small vocabularies for other espeak-ng languages: word salad with real phonology is enough here.
_OTHER = {
    "fr": "le chat mange une pomme rouge dans la maison petite grande belle ville avec mon ami voiture "
    "soleil jardin chante toujours bonjour merci demain fenêtre livre école parle rapidement",
    "de": "der Hund spielt mit einem roten Ball im Garten heute morgen schöne Stadt kleine Katze Wasser "
    "Fenster Brücke lachen immer wieder schnell langsam Freund Schule Buch",
    "es": "el perro come una manzana roja en la casa pequeña grande bonita ciudad con mi amigo coche sol "
    "jardín canta siempre mañana ventana libro escuela habla rápido",
    "it": "il gatto mangia una mela rossa nella casa piccola grande bella città con il mio amico macchina "
    "sole giardino canta sempre domani finestra libro scuola parla veloce",
}
LANGUAGES = ("en", *_OTHER)


def random_sentence(rng: np.random.Generator, language: str = "en") -> str:
    """A random, pronounceable sentence in `language` (one of LANGUAGES)."""
    if language == "en":
        template = _TEMPLATES_EN[rng.integers(len(_TEMPLATES_EN))]
        out = template
        while "{" in out:
            slot = out[out.index("{") + 1 : out.index("}")]
            words = _EN[slot].split("|") if slot == "place" else _EN[slot].split()
            out = out.replace("{" + slot + "}", words[rng.integers(len(words))], 1)
        return out
    if language not in _OTHER:
        raise ConfigError(f"unknown sentence language {language!r}; expected one of {LANGUAGES}")
    words = _OTHER[language].split()
    picked = [words[i] for i in rng.integers(len(words), size=int(rng.integers(5, 11)))]
    return " ".join(picked).capitalize() + "."


# ---------------------------------------------------------------- espeak-ng

# Built-in voice variants that still sound like a person (the robot/whisper ones are left out).
VARIANTS = [
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "klatt",
    "klatt2",
    "klatt3",
    "adam",
    "Alicia",
    "anika",
    "benjamin",
    "caleb",
    "david",
    "edward",
    "linda",
    "max",
    "michel",
    "paul",
    "quincy",
    "robert",
    "steph",
    "victor",
    "Andy",
    "Annie",
    "Denis",
    "Gene",
    "Jacky",
    "Lee",
    "Mario",
    "Michael",
    "Mike",
]
_ESPEAK_VOICE = {"en": "en-us", "fr": "fr", "de": "de", "es": "es", "it": "it"}


@dataclass(frozen=True)
class Voice:
    """An espeak-ng speaker: language, voice variant, speed (words per minute), pitch and pitch range (0-100)."""

    language: str = "en"
    variant: str = "m1"
    rate: int = 165
    pitch: int = 50
    pitch_range: int = 50

    @property
    def espeak_name(self) -> str:
        return f"{_ESPEAK_VOICE.get(self.language, self.language)}+{self.variant}"


def random_voice(rng: np.random.Generator, language: str = "en") -> Voice:
    """A random speaker: one of VARIANTS at a random speed, pitch and intonation range."""
    return Voice(
        language=language,
        variant=VARIANTS[rng.integers(len(VARIANTS))],
        rate=int(rng.integers(130, 215)),
        pitch=int(rng.integers(20, 80)),
        pitch_range=int(rng.integers(25, 90)),
    )


# Runs in a fresh `python -c` process. libespeak-ng keeps synthesis state from one call to the next
# (the same sentence comes out a few samples longer or shorter each time, whatever rand()'s seed), and
# cannot be re-initialised in-process, so each clip gets its own process: same clip, same sound.
# Protocol: one JSON request per line in; a JSON header line plus raw PCM16 out.
_WORKER = r"""
import ctypes, ctypes.util, json, sys

class Id(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]

class Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", Id)]

out = sys.stdout.buffer
path = ctypes.util.find_library("espeak-ng")
if path is None:
    error = "libespeak-ng not found; install it with `apt-get install -y espeak-ng`"
    out.write(json.dumps({"error": error}).encode() + b"\n")
    sys.exit(0)
lib = ctypes.CDLL(path)
lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                             ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
rate = lib.espeak_Initialize(2, 0, None, 1)  # synchronous output, with phoneme events
pcm, events = [], []

def on_audio(wav, n, ev):
    if n > 0:
        pcm.append(ctypes.string_at(wav, 2 * n))
    i = 0
    while ev[i].type != 0:
        if ev[i].type == 7:
            events.append([ev[i].sample, ev[i].id.string.decode("ascii", "replace")])
        i += 1
    return 0

callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(Event))(on_audio)
lib.espeak_SetSynthCallback(callback)
for line in sys.stdin:
    req = json.loads(line)
    del pcm[:], events[:]
    if lib.espeak_SetVoiceByName(req["voice"].encode()) != 0:
        out.write(json.dumps({"error": "espeak-ng has no voice " + repr(req["voice"])}).encode() + b"\n")
        out.flush()
        continue
    for param, value in ((1, req["rate"]), (3, req["pitch"]), (4, req["range"])):
        lib.espeak_SetParameter(param, value, 0)
    text = req["text"].encode("utf-8") + b"\0"
    lib.espeak_Synth(text, len(text), 0, 1, 0, 1, None, None)
    lib.espeak_Synchronize()
    data = b"".join(pcm)
    out.write(json.dumps({"rate": rate, "events": events, "bytes": len(data)}).encode() + b"\n" + data)
    out.flush()
"""


@dataclass
class Utterance:
    """One spoken sentence: 16 kHz float32 audio and its phonemes (times in seconds from the start)."""

    text: str
    audio: np.ndarray
    phones: list[Phone]


class EspeakSession:
    """A fresh espeak-ng process (context manager): the same sequence of `speak` calls in a new session
    always gives the same audio."""

    def __enter__(self) -> EspeakSession:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        return self

    def __exit__(self, *exc) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=10)

    def speak(self, text: str, voice: Voice = Voice()) -> Utterance:
        """Speak `text`; returns 16 kHz mono audio and the phoneme timings."""
        import soxr

        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        request = {"text": text, "voice": voice.espeak_name, "rate": voice.rate, "pitch": voice.pitch}
        request["range"] = voice.pitch_range
        try:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
            header = json.loads(proc.stdout.readline() or b"null")
        except (BrokenPipeError, json.JSONDecodeError):
            header = None
        if header is None:
            err = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.poll() is not None else []
            raise AudioError(f"espeak-ng worker failed: {err[-1] if err else 'no reply'}")
        if "error" in header:
            raise AudioError(header["error"])
        pcm = np.frombuffer(proc.stdout.read(header["bytes"]), dtype="<i2")
        if len(pcm) == 0:
            raise AudioError(f"espeak-ng produced no audio for {text!r}")
        sr, events = header["rate"], header["events"]
        audio = soxr.resample(pcm.astype(np.float32) / 32768.0, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
        bounds = [sample for sample, _ in events] + [len(pcm)]
        phones = [
            Phone(sym, bounds[i] / sr, bounds[i + 1] / sr)
            for i, (_, sym) in enumerate(events)
            if bounds[i + 1] > bounds[i]
        ]
        return Utterance(text, audio, phones)


def speak(text: str, voice: Voice = Voice()) -> Utterance:
    """Speak `text` with espeak-ng in a fresh session; returns 16 kHz mono audio and the phoneme timings."""
    with EspeakSession() as session:
        return session.speak(text, voice)


@dataclass
class SpeechTrack:
    """A clip's soundtrack: sentences separated by silences, with phoneme timings across the whole clip."""

    audio: np.ndarray
    phones: list[Phone]
    texts: list[str]
    voice: Voice
    # (start, end) seconds of each sentence's audio within the clip
    spans: list[tuple[float, float]]


def speech_track(
    rng: np.random.Generator,
    duration: float,
    voice: Voice,
    sentence_seeds: list[int],
    *,
    lead_silence: tuple[float, float] = (0.0, 0.6),
    gap: tuple[float, float] = (0.25, 1.2),
) -> SpeechTrack:
    """Sentences (each generated from one seed in `sentence_seeds`, in order, until the clip is full)
    spoken with pauses of random length in between, cut to exactly `duration` seconds.

    Sentences come from seeds so a caller can hold out sentence seeds for validation.
    """
    n_total = int(round(duration * SAMPLE_RATE))
    pieces: list[np.ndarray] = []
    phones: list[Phone] = []
    texts: list[str] = []
    spans: list[tuple[float, float]] = []
    t = int(rng.uniform(*lead_silence) * SAMPLE_RATE)
    pieces.append(np.zeros(t, np.float32))
    with EspeakSession() as session:
        for seed in sentence_seeds:
            if t >= n_total:
                break
            text = random_sentence(np.random.default_rng(seed), voice.language)
            utt = session.speak(text, voice)
            offset = t / SAMPLE_RATE
            phones += [Phone(p.symbol, p.start + offset, p.end + offset) for p in utt.phones]
            texts.append(text)
            spans.append((offset, min(offset + len(utt.audio) / SAMPLE_RATE, duration)))
            pieces.append(utt.audio)
            t += len(utt.audio)
            pause = int(rng.uniform(*gap) * SAMPLE_RATE)
            pieces.append(np.zeros(pause, np.float32))
            t += pause
    audio = np.concatenate(pieces)[:n_total]
    audio = np.pad(audio, (0, n_total - len(audio)))
    phones = [Phone(p.symbol, p.start, min(p.end, duration)) for p in phones if p.start < duration]
    return SpeechTrack(audio, phones, texts, voice, spans)


def speech_metadata(
    speech: SpeechTrack, tracks: MouthTracks, sentence_seeds: list[int], language: str, voice: Voice
) -> dict:
    """The clip-metadata entries every synthetic generator stores about its speech and mouth truth."""
    return {
        "text": " ".join(speech.texts),
        "sentences": speech.texts,
        "sentence_seeds": list(sentence_seeds[: len(speech.texts)]),
        "language": language,
        "voice": asdict(voice),
        "speech_spans": [[round(a, 4), round(b, 4)] for a, b in speech.spans],
        "phones": [[p.symbol, round(p.start, 4), round(p.end, 4)] for p in speech.phones],
        "mouth_open": tracks.open.tolist(),
        "mouth_width": tracks.width.tolist(),
        "mouth_round": tracks.round.tolist(),
    }
