"""Training of the mini world's two models: perception read-outs, then every question as its own
single-turn sequence behind a shared visual prompt; both models side by side in two processes."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cross_modal_sd.models.architectures import build_draft, build_target
from cross_modal_sd.models.eventgpt import save_eventgpt
from cross_modal_sd.models.prompts import encode_draft_prompt, encode_target_prompt
from cross_modal_sd.world.config import MiniWorld, MiniWorldConfig, TrainSpec
from cross_modal_sd.world.perception import Perception
from cross_modal_sd.world.qa import questions
from cross_modal_sd.world.samples import SceneViews
from cross_modal_sd.world.tokenizer import build_tokenizer


@dataclass
class _Scene:
    """One scene's questions as training tokens: the prompt part all its questions share (the
    visual prompt) and, per question, the rest of its single-turn prompt and its answer + EOS."""

    prefix: list[int]
    turns: list[tuple[list[int], list[int]]]


def _scene_turns(scenes: list[SceneViews], prompt, tokenizer) -> list[_Scene]:
    """Every question of every scene, split after the prompt ids its scene's questions share."""
    out = []
    for v in scenes:
        qas = questions(v.scene)
        prompts = [prompt(qa.question) for qa in qas]
        shared = 0
        while all(len(p) > shared and p[shared] == prompts[0][shared] for p in prompts):
            shared += 1
        answers = [tokenizer(qa.answer, add_special_tokens=False).input_ids for qa in qas]
        turns = [
            (p[shared:], a + [tokenizer.eos_token_id])
            for p, a in zip(prompts, answers, strict=True)
        ]
        out.append(_Scene(prompts[0][:shared], turns))
    return out


def shared_prefix_attention(blocks: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Additive attention mask and position ids that make each question an independent sequence.

    A row holds a scene's shared prompt (block 0), then its questions (blocks 1, 2, ...), then
    padding (-1). Each token attends causally to the shared prompt and to its own block only, and
    its position continues from the shared prompt, so every question is trained exactly as its
    own single-turn sequence while the visual prompt is computed once per scene.

    Args:
        blocks: (B, L) block id of every token.
        dtype: dtype of the mask.

    Returns:
        (B, 1, L, L) mask (0 where attended, the dtype's minimum elsewhere) and (B, L) positions.
    """
    length = blocks.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = blocks[:, :, None] == blocks[:, None, :]
    allowed = causal & (same | (blocks[:, None, :] == 0)) & (blocks[:, None, :] >= 0)
    allowed |= torch.eye(length, dtype=torch.bool)  # padding attends to itself (no empty rows)
    positions = (allowed.sum(-1) - 1).masked_fill(blocks < 0, 0)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None], positions


def _batch(scenes: list[_Scene], scene_ids: list[int], pad_id: int, expand: int = 0):
    """Right-padded ids and labels (answers only) of the scenes' questions, with the attention
    mask and positions of `shared_prefix_attention`. `expand` is the number of tokens the model
    adds to the shared prompt when it splices visual tokens in (the mask covers them)."""
    rows = []
    for i in scene_ids:
        scene = scenes[i]
        ids, labels, blocks = (
            list(scene.prefix),
            [-100] * len(scene.prefix),
            [0] * len(scene.prefix),
        )
        for k, (prompt, answer) in enumerate(scene.turns, start=1):
            ids += prompt + answer
            labels += [-100] * len(prompt) + answer
            blocks += [k] * (len(prompt) + len(answer))
        rows.append((ids, labels, [0] * expand + blocks))
    length = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    blocks = torch.full((len(rows), length + expand), -1, dtype=torch.long)
    for r, (a, b, c) in enumerate(rows):
        ids[r, : len(a)] = torch.tensor(a)
        labels[r, : len(b)] = torch.tensor(b)
        blocks[r, : len(c)] = torch.tensor(c)
    mask, positions = shared_prefix_attention(blocks)
    return ids, labels, mask, positions


def train_vlm(
    model,
    scenes: list[_Scene],
    visuals: torch.Tensor,
    visual_kw: str,
    spec: TrainSpec,
    seed: int,
    pad_id: int,
    expand: int = 0,
    report=None,
    perception: Perception | None = None,
) -> list[float]:
    """Teacher-forced cross-entropy on answers (plus the perception read-outs' loss, weighted by
    ``spec.perception_weight``); returns the answer loss per step.

    Every step reads `spec.batch_size` scenes, each with all of its questions as independent
    single-turn sequences sharing one visual prompt (`shared_prefix_attention`).

    Args:
        model: the VLM (its forward takes input_ids, a 4D attention_mask, position_ids, labels
            and `visual_kw`).
        scenes: per-scene tokens from `_scene_turns`.
        visuals: (n_scenes, ...) pixel tensors, indexed like `scenes`.
        visual_kw: name of the pixel argument of the model's forward.
        spec: optimiser settings.
        seed: seeds batch sampling.
        pad_id: padding id.
        expand: tokens the model adds to the prompt when it splices the visual tokens in.
        report: optional callable(step, loss) for progress.
        perception: read-outs trained with the model (their heads are not part of it).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    params = list(model.parameters())
    params += [] if perception is None else list(perception.heads.parameters())
    model.train()
    if perception is not None and spec.perception_steps:
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
        n = spec.perception_images or spec.batch_size * perception.images_per_scene
        for step in range(spec.perception_steps):
            loss = perception.pretrain_step(visuals, n, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if report is not None:
                report(step + 1, loss.item())
    if perception is not None and spec.perception_weight:
        seen, handle = perception.capture()
    else:
        seen, handle = None, None
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.1
    )
    losses = []
    for step in range(spec.steps):
        scene_ids = torch.randint(len(scenes), (spec.batch_size,), generator=gen).tolist()
        ids, labels, mask, positions = _batch(scenes, scene_ids, pad_id, expand)
        loss = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            labels=labels,
            **{visual_kw: visuals[scene_ids]},
        ).loss
        total = loss
        if seen is not None:
            aux = perception.loss(seen["tokens"], torch.tensor(scene_ids))
            total = loss + spec.perception_weight * aux
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if report is not None:
            report(spec.perception_steps + step + 1, float(np.mean(losses[-20:])))
    if handle is not None:
        handle.remove()
    model.eval()
    return losses


def _train_worker(kind: str, config: dict, out_dir: str, queue) -> None:
    """Trains and saves one model in its own process.

    One intra-op thread each (the two models train side by side on a 2-core machine, and tiny ops
    on oversubscribed threads stall badly); a model whose `TrainSpec.second_thread_at` is set
    takes a second thread (about 2x faster target steps) at that share of its steps, about when
    the cheaper draft finishes on such a machine. The switch is at a fixed step, not at the
    other model's end, so that a build is deterministic (thread counts change float rounding).
    """
    torch.set_num_threads(1)
    cfg = MiniWorldConfig.from_dict(config)
    spec = cfg.target_train if kind == "target" else cfg.draft_train
    second_thread_at = (
        None
        if spec.second_thread_at is None
        else int((spec.perception_steps + spec.steps) * spec.second_thread_at)
    )

    def report(step, loss):
        if step == second_thread_at:
            torch.set_num_threads(min(2, os.cpu_count() or 1))
        queue.put((kind, step, loss))

    tok = build_tokenizer()
    world = MiniWorld(Path(out_dir), cfg, tok)
    views = world.scenes("train")
    seed = cfg.seed + (0 if kind == "target" else 1)
    torch.manual_seed(seed)  # the initial weights (model and perception heads) come from the seed
    if kind == "target":
        model = build_target(
            tok, cfg.target_tower, cfg.target_decoder, cfg.image_size, cfg.n_frames
        )
        scenes = _scene_turns(
            views, lambda q: encode_target_prompt(tok, q, world.n_video_tokens), tok
        )
        expand = 0  # the prompt already holds one <video> id per visual token
        visuals, kw, spec = (
            torch.stack([v.frames for v in views]),
            "pixel_values_videos",
            cfg.target_train,
        )
        tap, encode, tower, width, sensor, images = (
            model.model.multi_modal_projector,
            lambda px: model.model.multi_modal_projector(
                model.model.video_tower(pixel_values=px.flatten(0, 1)).last_hidden_state
            ),
            cfg.target_tower,
            cfg.target_decoder.hidden,
            "rgb",
            cfg.n_frames,
        )
    else:
        model = build_draft(
            tok, cfg.draft_tower, cfg.draft_decoder, cfg.draft_image_size, cfg.event_frames
        )
        scenes = _scene_turns(views, lambda q: encode_draft_prompt(tok, q), tok)
        # One <event> placeholder becomes T temporal + S spatial tokens.
        expand = cfg.event_frames + cfg.draft_tower.tokens(cfg.draft_image_size) - 1
        visuals, kw, spec = (
            torch.stack([v.event_pixels for v in views]),
            "event_pixels",
            cfg.draft_train,
        )
        tap, encode, tower, width, sensor, images = (
            model.encoder.feature_adaptor,
            model.encoder,
            cfg.draft_tower,
            cfg.draft_decoder.hidden,
            "events",
            cfg.event_frames,
        )
    side = cfg.image_size if kind == "target" else cfg.draft_image_size
    grid = side // tower.patch
    perception = Perception.for_scenes(tap, encode, width, views, sensor, images, grid)
    losses = train_vlm(
        model,
        scenes,
        visuals,
        kw,
        spec,
        seed,
        tok.pad_token_id,
        expand,
        report=report,
        perception=perception,
    )
    if kind == "target":
        model.save_pretrained(world.target_dir, safe_serialization=True)
        tok.save_pretrained(world.target_dir)
    else:
        save_eventgpt(model, world.draft_dir)
        tok.save_pretrained(world.draft_dir)
    (Path(out_dir) / f"{kind}_losses.json").write_text(json.dumps(losses))
    queue.put((kind, "done", None))


def train_both(config: MiniWorldConfig, out_dir: Path) -> None:
    """Trains target and draft in two spawned processes, with one progress bar each."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = {
        kind: ctx.Process(
            target=_train_worker,
            args=(kind, dataclasses.asdict(config), str(out_dir), queue),
        )
        for kind in ("target", "draft")
    }
    for p in procs.values():
        p.start()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        tasks = {
            "target": progress.add_task(
                "train mini target (Video-LLaVA)",
                total=config.target_train.perception_steps + config.target_train.steps,
                loss=float("nan"),
            ),
            "draft": progress.add_task(
                "train mini draft (EventGPT)",
                total=config.draft_train.perception_steps + config.draft_train.steps,
                loss=float("nan"),
            ),
        }
        done: set[str] = set()
        while len(done) < 2:
            try:
                kind, step, loss = queue.get(timeout=5)
            except Exception:  # queue.Empty: check that no worker died silently
                dead = [k for k, p in procs.items() if k not in done and not p.is_alive()]
                if dead:
                    raise RuntimeError(
                        f"mini-world training of {dead} exited with code "
                        f"{[procs[k].exitcode for k in dead]}"
                    ) from None
                continue
            if step == "done":
                done.add(kind)
            else:
                progress.update(tasks[kind], completed=step, loss=loss)
    for p in procs.values():
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"mini-world training process exited with code {p.exitcode}")
