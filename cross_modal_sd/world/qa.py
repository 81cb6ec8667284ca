"""Questions with template answers about a mini-world scene.

Question types split by what each sensor can see: `motion`, `lane` and `moving` are answerable
from events (motion is all an event camera sees); `colour` and `parked` need RGB (colour, and
objects that do not move and so fire no events); `describe` needs both.
"""

from __future__ import annotations

from dataclasses import dataclass

from cross_modal_sd.world.scenes import LANES, RoadObject, Scene

QUESTION_TYPES = ("motion", "lane", "moving", "colour", "parked", "describe")
EVENT_VISIBLE = ("motion", "lane", "moving")
RGB_ONLY = ("colour", "parked")


@dataclass(frozen=True)
class QA:
    """One question about a scene, with its reference answer (words separated by spaces)."""

    question_id: str
    qtype: str
    question: str
    answer: str


def _lane(obj: RoadObject) -> str:
    return LANES[obj.lane]


def _doing(obj: RoadObject) -> str:
    return f"moving {obj.direction}" if obj.moving else "parked"


def _describe_obj(obj: RoadObject) -> str:
    return f"a {obj.colour} {obj.cls} {_doing(obj)} in the {_lane(obj)} lane"


def questions(scene: Scene) -> list[QA]:
    """All questions for a scene: per-object motion/lane/colour, and scene-level ones."""
    out: list[QA] = []
    sid = scene.scene_id
    for obj in scene.objects:
        c = obj.cls
        if obj.moving:
            motion = f"the {c} in the {_lane(obj)} lane is moving to the {obj.direction} ."
        else:
            motion = f"the {c} in the {_lane(obj)} lane is not moving , it is parked ."
        out.append(QA(f"{sid}/motion/{c}", "motion", f"which way is the {c} moving ?", motion))
        verb = "driving" if obj.moving else "parked"
        out.append(
            QA(
                f"{sid}/lane/{c}",
                "lane",
                f"which lane is the {c} in ?",
                f"the {c} is {verb} in the {_lane(obj)} lane of the road .",
            )
        )
        out.append(
            QA(
                f"{sid}/colour/{c}",
                "colour",
                f"what colour is the {c} ?",
                f"the {c} in the {_lane(obj)} lane is painted {obj.colour} .",
            )
        )
    moving = [o for o in scene.objects if o.moving]
    if moving:
        parts = [f"a {o.cls} is moving {o.direction} in the {_lane(o)} lane" for o in moving]
        ans = " and ".join(parts) + " ."
    else:
        ans = "nothing is moving , the road is still ."
    out.append(QA(f"{sid}/moving", "moving", "what is moving on the road ?", ans))
    parked = [o for o in scene.objects if not o.moving]
    if parked:
        o = parked[0]
        ans = f"yes , a {o.colour} {o.cls} is parked in the {_lane(o)} lane ."
    else:
        ans = "no , nothing is parked on the road , everything is moving ."
    out.append(QA(f"{sid}/parked", "parked", "is anything parked on the road ?", ans))
    light = "night" if scene.night else "day"
    objs = " and ".join(_describe_obj(o) for o in scene.objects)
    out.append(
        QA(f"{sid}/describe", "describe", "describe the scene .", f"it is {light} : {objs} .")
    )
    return out


def vocabulary() -> list[str]:
    """Every word a question, an answer or a prompt of the mini world can contain."""
    from cross_modal_sd.world.scenes import CLASSES, COLOURS, DIRECTIONS

    words = set(
        "which way is the moving ? lane in what colour to . , not it parked driving of road "
        "a and nothing still yes no on everything describe scene : day night anything painted "
        "USER: ASSISTANT:".split()
    )
    words |= set(CLASSES) | set(COLOURS) | set(DIRECTIONS) | set(LANES)
    return sorted(words)
