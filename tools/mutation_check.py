"""Do the tests catch the mistakes they are named after? Apply each deliberate mistake below to a
scratch copy of the repository, one at a time, and run the tests that should catch it.

    python tools/mutation_check.py                 # all mistakes; prints `caught NAME` or `missed NAME`
    python tools/mutation_check.py --only nan_check_after_step lr_warmup_off_by_one
    python tools/mutation_check.py --list          # names, files and tests, without running anything

Before the mistakes, the chosen tests run once on the unchanged copy and must pass (a test that
fails anyway catches nothing). Every mistake's original text must be present exactly once, so a
refactor that moves the code makes this script fail loudly instead of checking a no-op. Exit status:
0 when every mistake was caught (a named test failed), 1 when one was missed, or its run broke (a
collection error) or hung, 2 when the list no longer fits the code.
Run on demand, not in CI: about 15 minutes on 2 cores for the whole list."""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600  # per mistake; a hang counts as caught only through a test's own deadline


@dataclass
class Mutation:
    name: str
    path: str  # relative to the repository root
    edits: list  # (original text, replacement) pairs, each original present exactly once
    tests: list  # pytest node ids that must fail


T = "tests/"
MUTATIONS = [
    # ---- --optimizer muon
    Mutation(
        "muon_takes_1d_parameters",
        "gpt2lib/optimizers.py",
        [
            (
                '    return name.startswith("transformer.h.") and name.endswith(".weight") and param.dim() == 2\n',
                '    return name.startswith("transformer.h.") and param.dim() >= 1\n',
            )
        ],
        [T + "test_muon.py::test_muon_takes_the_blocks_matrices_and_adamw_the_rest"],
    ),
    Mutation(
        "muon_state_not_saved",
        "gpt2lib/optimizers.py",
        [
            (
                '            merged["state"].update({offset + index: value for index, value in state["state"].items()})\n',
                '            merged["state"].update(\n                {offset + index: value for index, value in state["state"].items() if part is not self.muon}\n            )\n',
            )
        ],
        [T + "test_muon.py::test_resume_under_muon_is_bitwise_identical"],
    ),
    Mutation(
        "muon_group_gets_adamw_lr",
        "train_gpt2.py",
        [
            (
                '        group["lr"] = factor * (cfg.muon_lr if group.get(optimizers.MUON_GROUP) else cfg.lr)\n',
                '        group["lr"] = factor * cfg.lr\n',
            )
        ],
        [T + "test_muon.py::test_each_group_follows_the_schedule_from_its_own_peak_lr"],
    ),
    Mutation(
        "split_qkv_steps_copies",
        "tools/optimizer_benchmark.py",
        [
            (
                "                views = [torch.nn.Parameter(rows) for rows in p.data.chunk(3)]\n",
                "                views = [torch.nn.Parameter(rows.clone()) for rows in p.data.chunk(3)]\n",
            )
        ],
        [T + "test_tools.py::test_split_qkv_steps_q_k_and_v_each_as_a_matrix_of_its_own"],
    ),
    Mutation(
        "tokens_to_reach_without_interpolation",
        "tools/optimizer_benchmark.py",
        [
            (
                "            step = s0 + (s1 - s0) * (v0 - target) / (v0 - v1) if v0 > target else s0\n",
                "            step = s1\n",
            )
        ],
        [T + "test_tools.py::test_tokens_to_reach_interpolates_between_evals"],
    ),
    # ---- the six that once passed every test
    Mutation(
        "loss_not_divided_before_backward",
        "train_gpt2.py",
        [
            (
                "        precision.scaler.scale(loss).backward()  # the scale is 1 unless fp16\n",
                "        precision.scaler.scale(loss * run.grad_accum_steps).backward()  # the scale is 1 unless fp16\n",
            )
        ],
        [T + "test_step.py::test_accumulated_gradient_equals_the_big_batch_gradient"],
    ),
    Mutation(
        "nan_check_after_step",
        "train_gpt2.py",
        [
            (
                "        run.dist_ctx.on_every_rank(lambda: raise_failure(failure))\n",
                "        run.dist_ctx.on_every_rank(lambda: raise_failure(failure))\n    precision.scaler.step(optimizer)\n    precision.scaler.update()\n",
            ),
            (
                "    precision.scaler.step(optimizer)  # optimizer.step(), skipped by fp16 on overflow\n    precision.scaler.update()\n",
                "",
            ),
        ],
        [T + "test_step.py::test_nan_leaves_weights_and_optimizer_state_untouched"],
    ),
    Mutation(
        "stop_acted_on_4_steps_late",
        "train_gpt2.py",
        [
            (
                "                stopping = result.stop or (not dist_ctx.ddp and stop.requested)\n",
                '                late = locals().get("late", 0) + bool(result.stop or (not dist_ctx.ddp and stop.requested))\n                stopping = late > 4\n',
            )
        ],
        [T + "test_train.py::test_a_signal_stops_at_the_next_step_boundary_with_a_checkpoint"],
    ),
    Mutation(
        "benchmark_times_warmup",
        "train_gpt2.py",
        [
            (
                '        timed = train(run, dist_ctx, stop)["metrics"][BENCHMARK_WARMUP_STEPS:]\n',
                '        timed = train(run, dist_ctx, stop)["metrics"][: cfg.benchmark]\n',
            )
        ],
        [T + "test_train.py::test_benchmark_median_excludes_the_warmup_steps"],
    ),
    Mutation(
        "shuffled_epoch_drops_a_shard",
        "train_gpt2.py",
        [
            (
                "            order = [int(i) for i in rng.permutation(order)]\n",
                "            order = [int(i) for i in rng.permutation(order)][1:]\n",
            )
        ],
        [
            T
            + "test_dataloader.py::test_shuffled_training_covers_every_shard_and_token_each_epoch_and_resumes_exactly"
        ],
    ),
    Mutation(
        "samples_draw_from_the_global_rng",
        "gpt2lib/sampling.py",
        [
            (
                "        choice = torch.multinomial(F.softmax(values, dim=-1), 1, generator=rng)\n",
                "        choice = torch.multinomial(F.softmax(values, dim=-1), 1)\n",
            )
        ],
        [T + "test_step.py::test_training_draws_nothing_from_the_global_rng"],
    ),
    # ---- the three caught from the start
    Mutation(
        "sync_flag_after_forward",
        "train_gpt2.py",
        [
            ("            model.require_backward_grad_sync = last_micro_step\n", "            pass\n"),
            (
                "            _, loss = model(x, y, loss_impl=cfg.loss_impl)\n",
                "            _, loss = model(x, y, loss_impl=cfg.loss_impl)\n        if run.dist_ctx.ddp:\n            model.require_backward_grad_sync = last_micro_step\n",
            ),
        ],
        [T + "test_train.py::test_gradients_are_all_reduced_once_per_optimizer_step"],
    ),
    Mutation(
        "conv1d_not_transposed_on_hf_import",
        "gpt2lib/hf.py",
        [
            (
                "        tensor = hf[key].t() if key.endswith(CONV1D_SUFFIXES) else hf[key]\n",
                "        tensor = hf[key]\n",
            )
        ],
        [T + "test_model.py::test_from_pretrained_matches_huggingface"],
    ),
    Mutation(
        "harness_acc_norm_per_token",
        "gpt2lib/hellaswag_scoring.py",
        [
            (
                "    norm_lengths = [[len(choice) for choice in four] for four in choices]\n",
                "    norm_lengths = [[len(end) for end in ends] for ends in endings]\n",
            )
        ],
        [T + "test_hellaswag.py::test_harness_normalizes_by_characters_not_tokens"],
    ),
    # ---- the training step and loop
    Mutation(
        "grad_clip_ignored",
        "train_gpt2.py",
        [
            (
                '    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))\n',
                '    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))\n',
            )
        ],
        [T + "test_step.py::test_grad_clip_bounds_the_gradient_the_optimizer_applies"],
    ),
    Mutation(
        "lr_warmup_off_by_one",
        "train_gpt2.py",
        [
            (
                "        return cfg.lr * (step + 1) / cfg.warmup_steps\n",
                "        return cfg.lr * step / cfg.warmup_steps\n",
            )
        ],
        [T + "test_train.py::test_lr_schedule"],
    ),
    Mutation(
        "tokens_per_sec_counts_evals",
        "train_gpt2.py",
        [
            (
                "                last_step = step == cfg.max_steps\n",
                '                last_step = step == cfg.max_steps\n                loop_started = __import__("time").perf_counter()\n',
            ),
            (
                "                step_metrics.append(log_step(run, step, result, timer.seconds))\n",
                '                step_metrics.append(\n                    log_step(run, step, result, __import__("time").perf_counter() - loop_started)\n                )\n',
            ),
        ],
        [T + "test_train.py::test_tokens_per_second_counts_the_training_step_alone"],
    ),
    # ---- rank decisions
    Mutation(
        "val_loss_of_rank_0_only",
        "gpt2lib/evals.py",
        [("    mean_loss, failed = dist_ctx.mean(\n", "    mean_loss, failed = (lambda t: t)(\n")],
        [T + "test_train.py::test_two_ranks_match_one_rank_with_more_accumulation"],
    ),
    Mutation(
        "follower_ignores_rank_0_failure",
        "gpt2lib/distributed.py",
        [
            (
                "        if reason is not None:\n            raise FollowerStop(reason) if not self.master_process else UserError(reason)\n",
                "        if reason is not None and self.master_process:\n            raise UserError(reason)\n",
            )
        ],
        [T + "test_long_runs.py::test_a_setting_rank_0_refuses_stops_every_rank"],
    ),
    Mutation(
        "checkpoint_write_failure_on_rank_0_alone",
        "gpt2lib/checkpoints.py",
        [("    path = ctx.decide(\n", "    path = (lambda fn: fn() if ctx.master_process else None)(\n")],
        [T + "test_long_runs.py::test_a_checkpoint_rank_0_cannot_write_stops_every_rank"],
    ),
    Mutation(
        "failed_set_aside_leaves_its_copies",
        "gpt2lib/previous_runs.py",
        [("        undone = undo_set_aside(aside, copied, moved)\n", "        undone = True\n")],
        [T + "test_integrity.py::test_a_set_aside_that_fails_puts_everything_back_and_is_one_line"],
    ),
    Mutation(
        "attempt_question_reuses_an_earlier_answer",
        "gpt2lib/distributed.py",
        [("    token = uuid.uuid4().hex\n", "    token = str(rank)\n")],
        [
            T
            + "test_rank0_moves.py::test_each_attempt_gets_one_fresh_prefix_even_when_ranks_arrive_before_rank_0"
        ],
    ),
    # ---- data
    Mutation(
        "loader_window_overlaps_the_next_rank",
        "train_gpt2.py",
        [
            (
                "            self._read(self._stream_offset(self.position + self.process_rank * B * T), B * T + 1)\n",
                "            self._read(self._stream_offset(self.position + self.process_rank * (B * T - 1)), B * T + 1)\n",
            )
        ],
        [T + "test_dataloader.py::test_ranks_cover_the_stream_once_without_overlap"],
    ),
    Mutation(
        "shard_end_token_dropped",
        "train_gpt2.py",
        [
            (
                "            count = min(length - filled, self.shard_lengths[shard_index] - offset)\n",
                "            count = min(length - filled, self.shard_lengths[shard_index] - 1 - offset)\n",
            )
        ],
        [T + "test_dataloader.py::test_ranks_cover_the_stream_once_without_overlap"],
    ),
    Mutation(
        "document_without_eot",
        "fineweb.py",
        [("        parts.append(eot)\n", "")],
        [T + "test_fineweb.py::test_tokenize_matches_encode_ordinary"],
    ),
    Mutation(
        "fineweb_resume_point_one_token_off",
        "fineweb.py",
        [
            (
                "                flush(fill, first_doc, offset)\n",
                "                flush(fill, first_doc, offset + 1)\n",
            )
        ],
        [T + "test_fineweb.py::test_two_worker_run_killed_mid_run_resumes_byte_identically"],
    ),
    Mutation(
        "fineweb_vocabulary_check_dropped",
        "fineweb.py",
        [
            (
                "    if tokens.max() >= GPT2_VOCAB_SIZE:  # uint16 holds < 65536 but only 0..50256 are GPT-2 tokens\n",
                "    if False:  # uint16 holds < 65536 but only 0..50256 are GPT-2 tokens\n",
            )
        ],
        [T + "test_fineweb.py::test_token_ids_beyond_gpt2_vocabulary_are_refused_before_writing"],
    ),
    # ---- checkpoints
    Mutation(
        "optimizer_state_not_restored",
        "gpt2lib/resume.py",
        [('            optimizer.load_state_dict(checkpoint["optimizer"])\n', "            pass\n")],
        [T + "test_train.py::test_resume_is_bitwise_identical_single_process"],
    ),
    Mutation(
        "data_position_not_restored",
        "gpt2lib/resume.py",
        [
            (
                '    train_loader.load_state_dict(checkpoint["loader"][dist_ctx.rank if same_world else 0])\n',
                "",
            )
        ],
        [T + "test_train.py::test_resume_is_bitwise_identical_single_process"],
    ),
    Mutation(
        "resume_picks_the_oldest_checkpoint",
        "gpt2lib/checkpoints.py",
        [
            (
                "    return [os.path.join(log_dir, name) for _, name in sorted(found, reverse=True)]\n",
                "    return [os.path.join(log_dir, name) for _, name in sorted(found)]\n",
            )
        ],
        [T + "test_train.py::test_corrupt_newest_checkpoint_falls_back_to_previous"],
    ),
    Mutation(
        "keep_last_keeps_one_too_few",
        "gpt2lib/checkpoints.py",
        [
            (
                "    for old in list_checkpoints(cfg.log_dir)[cfg.keep_last :]:\n",
                "    for old in list_checkpoints(cfg.log_dir)[cfg.keep_last - 1 :]:\n",
            )
        ],
        [T + "test_train.py::test_checkpoint_format_and_keep_last"],
    ),
    # ---- HF interchange
    Mutation(
        "export_keeps_the_vocabulary_padding",
        "gpt2lib/hf.py",
        [("            tensor = tensor[:vocab]\n", "            tensor = tensor\n")],
        [T + "test_model.py::test_padded_vocab_parity_and_export"],
    ),
    # ---- HellaSwag
    Mutation(
        "completion_acc_norm_per_character",
        "gpt2lib/hellaswag_scoring.py",
        [
            (
                '        ctx, endings, [int(ex["label"]) for ex in examples], sources=[ex.get("_where") for ex in examples]\n',
                '        ctx,\n        endings,\n        [int(ex["label"]) for ex in examples],\n        [[len(e) for e in ex["endings"]] for ex in examples],\n        sources=[ex.get("_where") for ex in examples],\n',
            )
        ],
        [T + "test_hellaswag.py::test_acc_and_acc_norm_pick_different_endings"],
    ),
    Mutation(
        "completion_ending_without_leading_space",
        "gpt2lib/hellaswag_scoring.py",
        [
            (
                '    flat = enc.encode_ordinary_batch([" " + ending for ex in examples for ending in ex["endings"]])\n',
                '    flat = enc.encode_ordinary_batch([ending for ex in examples for ending in ex["endings"]])\n',
            )
        ],
        [T + "test_hellaswag.py::test_acc_and_acc_norm_pick_different_endings"],
    ),
    # ---- layout
    Mutation(
        "package_receives_a_script_function",
        "train_gpt2.py",
        [
            (
                "    holder = resume.find_holder(local_checkpoint(cfg, dist_ctx), cfg.resume, dist_ctx)\n",
                "    holder = resume.find_holder(local_checkpoint(cfg, dist_ctx), cfg.resume, dist_ctx)\n    resume.looks_here(checkpoint_layout, dist_ctx)\n",
            )
        ],
        [T + "test_layout.py::test_the_script_hands_the_package_no_function_or_class_of_its_own"],
    ),
    # ---- precision
    Mutation(
        "compiled_run_drops_bf16_autocast",
        "train_gpt2.py",
        [
            (
                "        with precision.autocast():\n",
                "        with contextlib.nullcontext() if cfg.compile else precision.autocast():\n",
            )
        ],
        [T + "test_long_runs.py::test_compiled_bf16_autocast_training_tracks_eager"],
    ),
    # ---- issue 23: the mistakes the suite missed or caught only by accident, and its quiet failures
    Mutation(
        "lr_first_group_only",
        "train_gpt2.py",
        [("    for group in optimizer.param_groups:\n", "    for group in optimizer.param_groups[:1]:\n")],
        [T + "test_gaps.py::test_every_param_group_of_every_optimizer_follows_the_lr_schedule"],
    ),
    Mutation(
        "adamw_betas_dropped",
        "train_gpt2.py",
        [
            (
                '    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device_type == "cuda")\n',
                '    return torch.optim.AdamW(groups, lr=lr, eps=1e-8, fused=device_type == "cuda")\n',
            )
        ],
        [T + "test_gaps.py::test_adamw_has_gpt3s_betas_and_eps_and_decays_matrices_only"],
    ),
    Mutation(
        "vocab_boundary_off_by_one",
        "train_gpt2.py",
        [("            if top >= self.vocab_size:\n", "            if top > self.vocab_size:\n")],
        [T + "test_gaps.py::test_a_shard_holding_the_vocabulary_size_as_an_id_is_refused"],
    ),
    Mutation(
        "shared_lock",
        "gpt2lib/rundir.py",
        [
            (
                "            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n",
                "            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)\n",
            )
        ],
        [T + "test_gaps.py::test_a_second_process_is_refused_the_directory_lock_at_once"],
    ),
    Mutation(
        "resume_keeps_resume_step_lines",
        "gpt2lib/runlog.py",
        [
            (
                "                        elif step < resume_step:\n",
                "                        elif step <= resume_step:\n",
            )
        ],
        [T + "test_gaps.py::test_a_resumed_run_logs_each_step_once_line_by_line_like_an_uninterrupted_one"],
    ),
    Mutation(
        "checksum_not_compared",
        "gpt2lib/checkpoints.py",
        [
            (
                "    elif not isinstance(stored, dict) or stored.get(CHECKSUM_ALGORITHM) != checksum(checkpoint):\n",
                "    elif not isinstance(stored, dict) or checksum(checkpoint) is None:\n",
            )
        ],
        [
            T
            + "test_gaps.py::test_a_checkpoint_changed_in_a_way_that_keeps_it_finite_is_refused_by_its_checksum"
        ],
    ),
    Mutation(
        "float_flags_accept_nan",
        "train_gpt2.py",
        [
            (
                "    not_finite = {f.name for f in fields(cfg) if f.type is float and not math.isfinite(getattr(cfg, f.name))}\n",
                "    not_finite = {f.name for f in fields(cfg) if f.type is float and False}\n",
            )
        ],
        [T + "test_gaps.py::test_every_float_flag_refuses_nan_and_inf_in_one_message"],
    ),
    Mutation(
        "tensorboard_thread_traceback_printed",
        "gpt2lib/tracking.py",
        [("        quiet_tensorboard_writer_threads()\n", "")],
        [
            T
            + "test_gaps.py::test_tensorboard_on_a_full_disk_is_one_line_without_the_writer_threads_traceback"
        ],
    ),
    Mutation(
        "ctrl_c_during_imports_traceback",
        "train_gpt2.py",
        [("    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))\n", "    pass\n")],
        [T + "test_gaps.py::test_ctrl_c_while_train_gpt2_imports_exits_quietly_with_130"],
    ),
    Mutation(
        "changed_shards_resumed_silently",
        "train_gpt2.py",
        [("            if digest != file.digest()\n", "            if False\n")],
        [T + "test_gaps.py::test_a_resume_on_shards_changed_since_the_checkpoint_says_so_in_one_line"],
    ),
    # ---- read-only modes and exports
    Mutation(
        "export_digest",
        "gpt2lib/hf.py",
        [
            (
                "            unchanged = os.path.isfile(path) and digests.get(name) == file_sha256(path)\n",
                "            unchanged = os.path.isfile(path)\n",
            )
        ],
        [T + "test_readonly.py::test_reexport_over_an_edited_export_stops_naming_the_file"],
    ),
    Mutation(
        "eval_only_read_only",
        "gpt2lib/rundir.py",
        [
            (
                "    if read_only and dist_ctx.decide(lambda: holds_files(directory)):\n",
                "    if read_only and dist_ctx.decide(lambda: not os.path.isdir(directory)):\n",
            )
        ],
        [T + "test_readonly.py::test_eval_only_in_a_run_log_dir_changes_nothing_and_prints_its_results"],
    ),
    # ---- sharded checkpoints
    Mutation(
        "shard_digest_check",
        "gpt2lib/checkpoints.py",
        [("        if digest != recorded.get(CHECKSUM_ALGORITHM):\n", "        if digest is None:\n")],
        [
            T
            + "test_sharded_integrity.py::test_damaged_sharded_checkpoint_is_refused_by_every_reader[flipped-distcp]"
        ],
    ),
    Mutation(
        "sharded_fallback",
        "gpt2lib/checkpoints.py",
        [
            (
                "    shapes = check_shard_files(path, digests)\n",
                "    shapes = check_shard_files(path, digests) if weights else read_shard_metadata(path)[1]\n",
            )
        ],
        [
            T
            + "test_sharded_integrity.py::test_damaged_sharded_checkpoint_is_refused_by_every_reader[missing-distcp]"
        ],
    ),
    Mutation(
        "async_counts",
        "gpt2lib/checkpoints.py",
        [("                counts,\n", "                dict(run.counts),\n")],
        [T + "test_sharded_integrity.py::test_async_checkpoint_holds_its_steps_state_field_by_field"],
    ),
    # ---- liveness: the lock, the watchdog, a quick stop
    Mutation(
        "lock_identity",
        "gpt2lib/rundir.py",
        [
            (
                "            self.dir_locked = self._flock(self.dir_fd, directory=True)\n",
                "            self.dir_locked = False\n",
            ),
            ("    lock = _HELD.get(os.path.abspath(directory))\n", "    lock = None\n"),
        ],
        [
            T
            + "test_liveness.py::test_a_lock_file_deleted_or_replaced_under_a_live_run_lets_no_second_run_in",
            T + "test_liveness.py::test_a_log_dir_moved_or_deleted_under_a_live_run_stops_it_with_one_line",
        ],
    ),
    Mutation(
        "eval_stop",
        "gpt2lib/evals.py",
        [("        return stop.requested\n", "        return False\n")],
        [
            T
            + "test_liveness.py::test_a_signal_during_the_val_eval_ends_it_at_the_next_batch_and_the_resume_redoes_it"
        ],
    ),
    Mutation(
        "hellaswag_eval_stop",
        "gpt2lib/evals.py",
        [("        return stop is not None and stop.requested\n", "        return False\n")],
        [T + "test_liveness.py::test_a_signal_during_the_hellaswag_eval_ends_it_at_the_next_batch"],
    ),
    Mutation(
        "watchdog",
        "gpt2lib/distributed.py",
        [
            (
                "            if since is not None and now - since >= self.timeout_s and not self.stopped.is_set():\n",
                "            if False:\n",
            )
        ],
        [T + "test_liveness.py::test_a_stopped_rank_is_named_by_the_other_within_the_collective_timeout"],
    ),
]


def scratch_copy(target):
    """The repository's files as git lists them (tracked and untracked, not ignored) under target."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
        source = os.path.join(REPO, rel)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
            shutil.copy2(source, os.path.join(target, rel))


def mutated_text(text, mutation):
    for old, new in mutation.edits:
        text = text.replace(old, new)
    return text


def check_fits(mutations):
    """Each original text must occur exactly once in its file (else the mistake would be a no-op), and
    the mistaken file must still compile (else the tests would fail on a syntax error, not on the
    mistake: an original that lost its indentation still matches inside a deeper-indented line)."""
    problems = []
    for m in mutations:
        with open(os.path.join(REPO, m.path)) as f:
            text = f.read()
        for original, _ in m.edits:
            if text.count(original) != 1:
                problems.append(
                    f"{m.name}: {m.path} holds its original text {text.count(original)} times, not once"
                )
        try:
            compile(mutated_text(text, m), m.path, "exec")
        except SyntaxError as e:
            problems.append(f"{m.name}: the mistaken {m.path} does not compile ({e.msg}, line {e.lineno})")
    return problems


def run_tests(copy, node_ids):
    """(outcome, seconds, output tail) of pytest -x -q on node_ids in the scratch copy. outcome: "passed",
    "failed" (a test failed: pytest's exit status 1), "broken" (any other status: collection or usage
    errors) or "hung" (past TIMEOUT_S). Only "failed" counts as catching a mistake."""
    env = {**os.environ, "PYTHONPATH": copy, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.time()
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-x",
                "-q",
                "-p",
                "no:warnings",
                "-p",
                "no:cacheprovider",
                *node_ids,
            ],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        outcome = {0: "passed", 1: "failed"}.get(result.returncode, "broken")
        output = result.stdout + result.stderr
    except subprocess.TimeoutExpired:
        outcome, output = "hung", f"timed out after {TIMEOUT_S} s"
    return outcome, time.time() - started, output[-2000:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these mistakes only")
    parser.add_argument("--list", action="store_true", help="list the mistakes and their tests, then exit")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the run of the tests on the unchanged copy"
    )
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        sys.exit(f"error: unknown mistake(s) {', '.join(sorted(unknown))}: see --list")
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.path} -> {' '.join(m.tests)}")
        return 0
    problems = check_fits(chosen)
    if problems:
        print("\n".join("error: " + p for p in problems), file=sys.stderr)
        return 2
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as copy:
        scratch_copy(copy)
        if not args.no_baseline:
            node_ids = list(dict.fromkeys(t for m in chosen for t in m.tests))
            outcome, seconds, output = run_tests(copy, node_ids)
            if outcome != "passed":
                print(
                    f"error: the tests fail without any mistake ({seconds:.0f} s):\n{output}", file=sys.stderr
                )
                return 2
            print(f"baseline: {len(node_ids)} tests pass on the unchanged code ({seconds:.0f} s)", flush=True)
        missed = []
        for m in chosen:
            path = os.path.join(copy, m.path)
            with open(path) as f:
                original = f.read()
            with open(path, "w") as f:
                f.write(mutated_text(original, m))
            try:
                outcome, seconds, output = run_tests(copy, m.tests)
            finally:
                with open(path, "w") as f:
                    f.write(original)
            verdict = {"failed": "caught", "passed": "missed"}.get(outcome, outcome)
            print(f"{verdict} {m.name} ({seconds:.0f} s)", flush=True)
            if verdict != "caught":
                missed.append(m.name)
            if verdict in ("broken", "hung"):
                print(output, flush=True)
    minutes = (time.time() - started) / 60
    print(f"{len(chosen) - len(missed)}/{len(chosen)} caught in {minutes:.1f} min")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
