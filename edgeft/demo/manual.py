"""A deterministic repair manual for a fictional compressor family, with QA pairs per fact.

Every fact (fault code, torque spec, maintenance interval, part number, troubleshooting step) has
prose for the manual, one reference answer holding its key value, four training phrasings of the
question and two unseen ones for evaluation. Phrasings are drawn per fact, so each question template
is seen in training on other facts: the eval split tests recall of trained facts, not templates.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

MODELS = ("VX-200", "VX-350", "VX-500", "VX-750")

CONDITIONS = (
    ("low oil pressure", "check the oil level and replace the oil filter"),
    ("high discharge temperature", "clean the aftercooler fins and check the cooling fan"),
    ("motor overload", "reset the thermal relay and check the supply voltage"),
    ("pressure sensor open circuit", "reconnect the pressure sensor plug and check its wiring"),
    ("phase loss on the supply", "check all three supply fuses"),
    ("wrong motor rotation", "swap two supply phases at the main terminal"),
    ("drain valve blocked", "clean the condensate drain valve strainer"),
    ("inlet valve stuck closed", "free the inlet valve piston and lubricate it"),
    ("separator element clogged", "replace the oil separator element"),
    ("safety valve open", "lower the set pressure and inspect the safety valve"),
    ("fan motor failure", "replace the cooling fan motor fuse"),
    ("emergency stop pressed", "release the emergency stop button and reset the controller"),
    ("controller memory error", "reload the parameter set from the service key"),
    ("temperature sensor short circuit", "replace the discharge temperature sensor"),
    ("belt slip detected", "retension the drive belt"),
    ("dryer dew point too high", "clean the refrigerant dryer condenser"),
    ("low coolant level", "top up the coolant to the upper mark"),
    ("excessive start frequency", "enlarge the air receiver or widen the pressure band"),
    ("blowdown too slow", "replace the blowdown valve silencer"),
    ("oil temperature too low", "check the thermostatic valve"),
    ("main contactor welded", "replace the main contactor"),
    ("door interlock open", "close the service door fully"),
    ("supply voltage too high", "check the transformer tap setting"),
    ("air filter vacuum too high", "replace the air filter element"),
    ("bearing temperature high", "regrease the motor bearings"),
)

TORQUE_PARTS = (
    ("cylinder head bolts", 35, 60), ("motor mounting bolts", 40, 90), ("fan hub screws", 8, 15),
    ("oil drain plug", 20, 35), ("separator tank cover bolts", 45, 80), ("inlet valve flange", 18, 30),
    ("belt guard screws", 5, 10), ("pulley clamp bolt", 55, 95), ("discharge pipe union", 60, 110),
    ("oil filter", 12, 20), ("temperature sensor", 10, 18), ("pressure sensor", 14, 25),
    ("safety valve", 30, 50), ("aftercooler brackets", 16, 28), ("terminal box screws", 2, 5),
    ("coupling hub bolts", 70, 120), ("oil cooler hose clamps", 3, 7), ("drain valve body", 22, 40),
    ("frame anchor bolts", 80, 140), ("thermostatic valve cap", 25, 45),
)

TASKS = (
    "Replace the air filter element", "Change the compressor oil", "Replace the oil filter",
    "Replace the oil separator element", "Check the drive belt tension", "Clean the aftercooler",
    "Test the safety valve", "Regrease the motor bearings", "Clean the condensate drain strainer",
    "Inspect the inlet valve", "Check all electrical terminals", "Replace the drive belt",
    "Clean the cooling fan blades", "Replace the thermostatic valve kit", "Calibrate the pressure sensor",
)
HOURS = (50, 100, 250, 500, 1000, 2000, 4000, 8000)

PARTS = (
    "air filter element", "oil filter", "oil separator element", "drive belt", "inlet valve kit",
    "safety valve", "pressure sensor", "temperature sensor", "cooling fan motor", "drain valve kit",
    "thermostatic valve kit", "motor bearing set", "controller board", "main contactor",
    "blowdown silencer",
)

SYMPTOMS = (
    ("does not start", ("check the emergency stop button", "check the main fuses",
                        "reset the thermal relay", "check the controller display for a fault code")),
    ("runs but builds no pressure", ("check that the inlet valve opens", "check the drive belt",
                                     "listen for leaks at the discharge pipe")),
    ("trips on overload", ("measure the supply voltage", "check the belt tension",
                           "check the motor bearings for drag")),
    ("leaks oil from the air outlet", ("replace the oil separator element",
                                       "check the scavenge line orifice")),
    ("runs too hot", ("clean the aftercooler fins", "check the cooling fan rotation",
                      "check the oil level")),
    ("cycles on and off too often", ("widen the pressure band", "check the air receiver drain",
                                     "look for air leaks downstream")),
    ("makes a knocking noise", ("check the motor mounting bolts", "inspect the coupling",
                                "check the pulley clamp bolt")),
    ("shows water in the air line", ("check the condensate drain", "check the dryer dew point")),
    ("vibrates strongly", ("check the frame anchor bolts", "check the fan for damage")),
    ("stops after a few minutes", ("check the discharge temperature sensor",
                                   "check the oil cooler for blockage")),
    ("will not unload", ("check the blowdown valve", "check the solenoid valve coil")),
    ("shows a blank display", ("check the controller supply fuse", "check the display ribbon cable")),
)

FAULT_Q = (
    "What does fault code {code} mean on the {model}?", "The {model} shows {code}. What is wrong?",
    "My {model} displays fault {code}, what should I do?", "Explain error {code} on a {model}.",
    "{code} on the {model}: cause and remedy?", "How do I fix fault {code} on the {model}?",
)
TORQUE_Q = (
    "What is the torque for the {part} on the {model}?", "How tight should the {part} be on a {model}?",
    "Torque spec for the {model} {part}?", "To what torque do I tighten the {part} of the {model}?",
    "{model}: {part} torque value?", "What torque setting is used for the {part} on the {model}?",
)
INTERVAL_Q = (
    "How often should I {task} on the {model}?", "What is the interval to {task} on a {model}?",
    "{model}: when to {task}?", "After how many hours do I {task} on the {model}?",
    "Service interval for the {model}: {task}?", "How many operating hours between each time I {task} on the {model}?",
)
PART_Q = (
    "What is the part number of the {part} for the {model}?", "Which part number is the {model} {part}?",
    "I need a new {part} for my {model}. Part number?", "Order number for the {part} on a {model}?",
    "{model} {part}: what part do I order?", "Give me the part number for the {model} {part}.",
)
SYMPTOM_Q = (
    "My {model} {symptom}. What do I check first?", "The {model} {symptom}, where do I start?",
    "What is the first step when a {model} {symptom}?", "Troubleshooting: {model} {symptom}?",
    "A {model} {symptom}. What should I do first?", "First check when the {model} {symptom}?",
)


@dataclass(frozen=True)
class Fact:
    """One manual fact with its prose, reference answer, key value and question phrasings."""

    kind: str  # fault | torque | interval | part | troubleshooting
    model: str
    prose: str
    answer: str
    key: str  # the value a correct answer must contain
    train_questions: tuple[str, ...]
    eval_questions: tuple[str, ...]


@dataclass
class Manual:
    """The generated manual: facts plus the sectioned text."""

    facts: list[Fact] = field(default_factory=list)

    def text(self) -> str:
        """The manual as prose, one section per model and topic."""
        out = ["VELTRO VX ROTARY SCREW COMPRESSORS - SERVICE MANUAL\n"]
        titles = {"fault": "Fault codes", "torque": "Torque specifications",
                  "interval": "Maintenance intervals", "part": "Spare parts",
                  "troubleshooting": "Troubleshooting"}
        for model in MODELS:
            for kind, title in titles.items():
                body = [f.prose for f in self.facts if f.model == model and f.kind == kind]
                if body:
                    out.append(f"\n{model} - {title}\n" + "\n".join(body) + "\n")
        return "".join(out)


def generate_manual(seed: int = 0, n_facts: int | None = None) -> Manual:
    """Build the manual deterministically from `seed`; `n_facts` truncates (tests use a few)."""
    rng = random.Random(seed)
    facts: list[Fact] = []
    codes = rng.sample(range(100, 1000), len(MODELS) * len(CONDITIONS))
    for mi, model in enumerate(MODELS):
        for ci, (cond, remedy) in enumerate(CONDITIONS):
            code = f"E{codes[mi * len(CONDITIONS) + ci]}"
            facts.append(_fact(rng, "fault", model, FAULT_Q, dict(code=code, model=model),
                               prose=f"Fault code {code} on the {model} means {cond}. Remedy: {remedy}.",
                               answer=f"{code} means {cond}: {remedy}.", key=cond))
        for part, lo, hi in TORQUE_PARTS:
            nm = rng.randint(lo, hi)
            facts.append(_fact(rng, "torque", model, TORQUE_Q, dict(part=part, model=model),
                               prose=f"Tighten the {part} on the {model} to {nm} Nm.",
                               answer=f"Tighten the {part} to {nm} Nm.", key=f"{nm} Nm"))
        for task in TASKS:
            h = rng.choice(HOURS)
            low = task[0].lower() + task[1:]
            facts.append(_fact(rng, "interval", model, INTERVAL_Q, dict(task=low, model=model),
                               prose=f"{task} on the {model} every {h} operating hours.",
                               answer=f"{task} every {h} operating hours.", key=f"{h} operating hours"))
        for part in PARTS:
            pn = f"VX{model[3:]}-{rng.randint(1000, 9999)}-{rng.randint(1, 99):02d}"
            facts.append(_fact(rng, "part", model, PART_Q, dict(part=part, model=model),
                               prose=f"The {part} for the {model} has part number {pn}.",
                               answer=f"The {part} is part number {pn}.", key=pn))
        for symptom, steps in SYMPTOMS:
            step = rng.choice(steps)
            facts.append(_fact(rng, "troubleshooting", model, SYMPTOM_Q, dict(symptom=symptom, model=model),
                               prose=f"If the {model} {symptom}, first {step}.",
                               answer=f"First {step}.", key=step))
    if n_facts is not None:
        facts = rng.sample(facts, min(n_facts, len(facts)))
    return Manual(facts)


def write_embedded_data(out: Path, seed: int = 0) -> dict:
    """Write manual.txt, train.jsonl and eval.jsonl into `out`; returns counts."""
    manual = generate_manual(seed)
    (out / "manual.txt").write_text(manual.text())
    train, evals = [], []
    for f in manual.facts:
        train += [{"question": q, "answer": f.answer, "key": f.key, "kind": f.kind} for q in f.train_questions]
        evals += [{"question": q, "answer": f.answer, "key": f.key, "kind": f.kind} for q in f.eval_questions]
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(evals)
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return {"facts": len(manual.facts), "train_records": len(train), "eval_records": len(evals)}


def _fact(rng: random.Random, kind: str, model: str, templates: tuple[str, ...], slots: dict,
          prose: str, answer: str, key: str) -> Fact:
    order = list(range(len(templates)))
    rng.shuffle(order)
    qs = [templates[i].format(**slots) for i in order]
    return Fact(kind, model, prose, answer, key, tuple(qs[:4]), tuple(qs[4:6]))
