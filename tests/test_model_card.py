"""The model card in final/ (and the run folder), written with huggingface_hub.ModelCard, and push_to_hub of final/
with its card to a loopback stand-in for the Hub."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from grpo_llm_eval.config.load import ConfigError, load_config, validate
from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.training import model_card
from grpo_llm_eval.training.train import train
from tests.conftest import tiny_overrides
from tests.hub_server import RecordingHub

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cret-pass-7d1e"


def quick_start(card: ModelCard) -> str:
    [code] = re.findall(r"```python\n(.*?)```", card.text, re.S)
    return code


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    """A 1-step run of the tiny model against a teacher URL that carries user:password@."""
    out = tmp_path_factory.mktemp("card-run")
    with TeacherServer(mode="scripted") as server:
        url = server.base_url.replace("http://", f"http://grader:{SECRET}@")
        cfg = load_config(None, tiny_overrides(tiny_model, out, openai_base_url=url, total_steps=1))
        return train(cfg).run_dir


class TestCardOfATrainingRun:
    def test_final_holds_a_card_that_loads_and_names_teacher_rubric_data_steps_and_spend(self, tiny_run):
        """Before: final/ had no card at all (peft's or none) and the run folder had TRL's, "a fine-tuned version
        of [None](https://huggingface.co/None)"."""
        card = ModelCard.load(tiny_run / "final" / "README.md")
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
        assert {"grpo", "trl", "llm-judge"} <= set(card.data.tags)
        assert "None" not in str(card)
        text = card.text
        assert "Teacher: `teacher`, backend `openai`" in text
        for name, weight in (("thought_process", "0.07"), ("answer", "0.1"), ("format", "0.03")):
            assert f"| `{name}` | {weight} |" in text
        assert "`bundled:arithmetic`" in text and "Steps: 1 of 1" in text
        assert re.search(r"\d+ teacher calls, [\d,]+ prompt \+ [\d,]+ completion tokens", text)

    def test_the_run_folders_readme_is_the_same_card(self, tiny_run):
        assert (tiny_run / "README.md").read_bytes() == (tiny_run / "final" / "README.md").read_bytes()
        assert not list(tiny_run.rglob("README.md.partial"))

    def test_a_teacher_urls_password_appears_in_no_file_of_the_run(self, tiny_run):
        card = ModelCard.load(tiny_run / "final" / "README.md")
        assert "grader" not in card.text and "http://127.0.0.1:" in card.text
        for path in tiny_run.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path

    def test_the_quick_start_loads_the_model_from_its_own_folder_and_generates(self, tiny_run):
        code = quick_start(ModelCard.load(tiny_run / "final" / "README.md"))
        assert repr(str((tiny_run / "final").resolve())) in code
        scope: dict = {}
        exec(compile(code, "quick_start", "exec"), scope)  # the card's own code, as a reader runs it
        assert scope["output"].shape[1] > scope["inputs"]["input_ids"].shape[1]  # it generated

    def test_report_with_eval_and_calibration_rewrites_the_card_with_them(self, tiny_run, tmp_path):
        from grpo_llm_eval.evaluation.report import build_report

        summary = {"models": [{"model": "run:x", "n": 3, "metrics": {"answer_accuracy": {"mean": 0.5, "ci_low": 0.2,
                                                                                            "ci_high": 0.8}}}],
                   "comparisons": []}
        (tmp_path / "eval_summary.json").write_text(json.dumps(summary))
        calibration = {"answer_auc": 0.91, "answer_auc_ci": [0.8, 0.97], "n_right": 10, "n_wrong": 9,
                       "reward_auc": 0.9, "reward_auc_ci": None, "length_bias": 0.01, "self_disagreement": None,
                       "position_flip_rate": None, "master_key_pass_rate": 0.0, "judge_failure_rate": 0.0,
                       "null_reasons": {}, "verdict": "usable: the teacher separates right from wrong answers"}
        (tmp_path / "calibration.json").write_text(json.dumps(calibration))
        build_report(tiny_run, output=tmp_path / "r.html", eval_dir=tmp_path, calibration_dir=tmp_path)
        text = ModelCard.load(tiny_run / "final" / "README.md").text
        assert "0.500 [0.200, 0.800]" in text and "answer_accuracy" in text
        assert "Verdict: usable: the teacher separates right from wrong answers" in text and "0.910" in text
        assert (tiny_run / "README.md").read_text() == (tiny_run / "final" / "README.md").read_text()


class TestCardParts:
    def test_base_model_is_the_hub_id_or_what_a_bundled_model_was_made_from(self, tmp_path):
        assert model_card.base_model_of("bundled:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert model_card.base_model_of("mkurman/Llama-3.2-MedIT-SUN-2.5B-BT-GRPO") == "mkurman/Llama-3.2-MedIT-SUN-2.5B-BT-GRPO"
        assert model_card.base_model_of(str(tmp_path)) is None  # a local folder without a card
        (tmp_path / "README.md").write_text("---\nbase_model: org/parent\n---\n# a run's final/\n")
        assert model_card.base_model_of(str(tmp_path)) == "org/parent"

    def test_datasets_are_named_only_when_they_are_hub_ids(self, tmp_path):
        assert model_card.hub_dataset_of("open-r1/OpenR1-Math-220k") == "open-r1/OpenR1-Math-220k"
        assert model_card.hub_dataset_of("bundled:arithmetic") is None
        assert model_card.hub_dataset_of("data/train.jsonl") is None
        assert model_card.hub_dataset_of(str(tmp_path)) is None

    def test_a_url_loses_its_credentials_and_query(self):
        assert model_card.safe_url("https://u:p@api.example.com:8443/v1?api_key=sk-1#x") == "https://api.example.com:8443/v1"
        assert model_card._urls("http://a:1@h1/v1, http://h2/v1?key=k") == ["http://h1/v1", "http://h2/v1"]


class TestPushConfig:
    def test_push_to_hub_without_a_repo_or_with_a_token_in_the_yaml_is_a_config_error(self):
        with pytest.raises(ConfigError) as info:
            validate({"trl": {"push_to_hub": True, "hub_token": "hf_x", "hub_strategy": "every_save"}})
        text = "\n".join(info.value.problems)
        assert "trl.hub_model_id" in text and "HF_TOKEN" in text and "trl.hub_strategy" in text
        assert "hf_x" not in text
        assert validate({"trl": {"push_to_hub": True, "hub_model_id": "me/m"}}).trl["push_to_hub"] is True


class TestPushToHub:
    def test_a_bundled_students_run_pushes_final_with_its_card(self, tmp_path):
        """The seed's path for sharing: trl: {push_to_hub: true, hub_model_id: ...}. Before: TRL would have created
        the repo when the trainer was built and uploaded the run folder (rollouts, judgement cache) with TRL's card
        naming base model None. Now final/ is uploaded, once, with the card, and the card names the real base."""
        with TeacherServer(mode="scripted") as server, RecordingHub() as hub:
            sets = tiny_overrides("bundled:smollm2-135m-instruct", tmp_path, openai_base_url=server.base_url,
                                  total_steps=1, **{"lora.enabled": True, "trl.push_to_hub": True,
                                                    "trl.hub_model_id": "me/grpo-card-test"})
            env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test_token_5c2"}
            res = subprocess.run([sys.executable, "-m", "grpo_llm_eval.cli", *[a for s in sets for a in ("--set", s)]],
                                 capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-3000:]
        final = tmp_path / "run" / "final"
        card = ModelCard.load(final / "README.md")
        assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and "None" not in str(card)
        assert "'me/grpo-card-test'" in quick_start(card)
        assert [r[:2] for r in hub.requests if r[0] == "POST"] == [("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
                                                  ("POST", "/api/models/me/grpo-card-test/preupload/main"),
                                                  ("POST", "/api/models/me/grpo-card-test/commit/main")]
        assert all(auth == "Bearer hf_test_token_5c2" for method, _, auth in hub.requests if method == "POST")
        pushed = hub.files["me/grpo-card-test"]
        local = {str(p.relative_to(final)): p.read_bytes() for p in final.rglob("*") if p.is_file()}
        assert pushed == local and "adapter_model.safetensors" in pushed
        assert ModelCard(pushed["README.md"].decode()).data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        for path in (tmp_path / "run").rglob("*"):
            if path.is_file():
                assert b"hf_test_token_5c2" not in path.read_bytes(), path

    def test_a_failed_upload_exits_1_with_one_line_and_keeps_final_with_its_card(self, tiny_model, tmp_path):
        with TeacherServer(mode="scripted") as server, RecordingHub(fail_commits=True) as hub:
            sets = tiny_overrides(tiny_model, tmp_path, openai_base_url=server.base_url, total_steps=1,
                                  **{"trl.push_to_hub": True, "trl.hub_model_id": "me/down"})
            env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test_token_5c2"}
            res = subprocess.run([sys.executable, "-m", "grpo_llm_eval.cli", *[a for s in sets for a in ("--set", s)]],
                                 capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
        [line] = [x for x in res.stderr.splitlines() if x.startswith("error")]
        final = tmp_path / "run" / "final"
        assert line.startswith("error: push_to_hub: uploading") and f"hf upload me/down {final}" in line
        assert ModelCard.load(final / "README.md").data.tags[:3] == ["grpo", "trl", "llm-judge"]
