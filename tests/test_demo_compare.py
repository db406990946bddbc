"""The demo's side-by-side of the two latent spaces, on hand-made reports with known winners, and the
token-latent stages it appends."""
import json
import os

from launch import demo


def report(frechet_ratio, validity, mem, held_mem, form, meter, d2, d2_real, mauve):
    adh = {"form": {"accuracy": form}}
    adh["meter"] = {"accuracy": meter} if meter is not None else {"skipped": "no labels"}
    return {"frechet": {"ratio": frechet_ratio}, "word_validity": {"generated": validity},
            "memorisation_4gram": {"generated": mem, "held_out": held_mem}, "adherence": adh,
            "distinct": {"distinct_2": {"generated": d2, "real": d2_real}}, "mauve": mauve}


def test_compare_latent_spaces_picks_the_better_side_per_metric(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    ra = report(1.2, 0.99, 0.05, 0.30, 0.5, 0.3, 0.95, 0.90, 0.10)
    ra["word_validity"]["generated_free"] = 0.70         # spelt from a lexicon: the free figure is compared
    a.write_text(json.dumps(ra))
    b.write_text(json.dumps(report(1.8, 0.90, 0.50, 0.30, 0.5, None, 0.80, 0.90, "error: x")))
    rows = {r["metric"]: r for r in demo.compare_latent_spaces(str(a), str(b), str(tmp_path / "cmp"))}
    bart, tok = demo.SPACES
    assert rows["Fréchet ÷ real-vs-real (latents)"]["winner"] == bart          # lower wins
    assert rows["word validity (free spelling)"]["winner"] == tok               # higher wins
    assert rows["4-gram memorisation − held-out's own"]["winner"] == bart
    assert abs(rows["4-gram memorisation − held-out's own"][tok] - 0.2) < 1e-9
    assert rows["adherence: form"]["winner"] is None                            # a tie
    assert rows["adherence: meter"][tok] is None and rows["adherence: meter"]["winner"] is None
    assert rows["distinct-2 − held-out's"]["winner"] == bart                    # 0.05 from real vs 0.10
    assert rows["MAUVE (MiniLM features)"]["winner"] is None                    # b has none
    md = (tmp_path / "cmp.md").read_text()
    assert md.count("\n") == 2 + len(demo.COMPARED) and "| word validity (free spelling) (higher) | 0.700 | 0.900 | token embeddings |" in md
    assert json.loads((tmp_path / "cmp.json").read_text())["rows"][0]["metric"].startswith("Fréchet")
    assert os.path.getsize(tmp_path / "cmp.png") > 5000


def test_token_stages_mirror_the_bart_diffusion_stages():
    """Same diffusion YAMLs (so the same budget), own output folders, the same evaluation YAML."""
    main = {s.name: s for s in demo._default_stages()}
    tok = {s.name: s for s in demo._token_stages()}
    for a, b in (("pretrain_masked", "token_pretrain_masked"), ("finetune_unmasked", "token_finetune_unmasked"),
                 ("evaluate_generation", "token_evaluate_generation")):
        assert main[a].yaml == tok[b].yaml
        assert main[a].quick == tok[b].quick
    outs = [o for s in tok.values() for o in s.overrides if o.startswith("out_dir=")]
    assert len(set(outs)) == len(outs) and not set(outs) & {o for s in main.values() for o in s.overrides}


def test_a_second_run_in_the_same_folder_keeps_the_first_runs_summary(tmp_path):
    # The real prep stage on the quick slice; the second run finds its shards done and skips the work.
    out = str(tmp_path / "demo")
    first = demo.run(demo.DemoConfig(out_dir=out, quick=True, only=["prep"]))
    assert first["done"] == ["prep"] and "earlier" not in first
    assert os.path.isfile(os.path.join(out, "text_shards", "train", "index.json"))
    second = demo.run(demo.DemoConfig(out_dir=out, quick=True, only=["prep"]))
    third = demo.run(demo.DemoConfig(out_dir=out, quick=True, only=["prep"]))
    with open(os.path.join(out, "demo_summary.json")) as f:
        saved = json.load(f)
    assert saved["stage_seconds"] == third["stage_seconds"]
    assert [s["stage_seconds"] for s in saved["earlier"]] == [first["stage_seconds"], second["stage_seconds"]]
    assert "earlier" not in saved["earlier"][1]   # flat, not nested
    # an unreadable summary is replaced, not a crash
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        f.write("{not json")
    fourth = demo.run(demo.DemoConfig(out_dir=out, quick=True, only=["prep"]))
    assert "earlier" not in fourth
    kept = [f for f in os.listdir(out) if f.startswith("demo_summary.json.unreadable-")]
    assert len(kept) == 1 and open(os.path.join(out, kept[0])).read() == "{not json"   # kept, not lost


def test_the_demo_runs_on_your_own_poems(tmp_path):
    """`latentverse demo data.path=FILE`: the prep stage reads the user's poems instead of the bundled
    corpus, and a long poem is cut into pieces that fit the demo autoencoder's window, none dropped."""
    poems = [{"text": f"the {w} of morning\nfalls on the {w} of night", "form": "couplet"}
             for w in ("moon", "river", "stone", "wind", "ember", "harbor", "lantern", "meadow", "thunder", "crow")]
    poems.append({"text": "\n\n".join(f"a long stanza {i} of words that go on\nand on until the line is done"
                                         for i in range(6)), "form": "ode"})
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in poems) + "\n")
    out = str(tmp_path / "demo")
    done = demo.run(demo.DemoConfig(out_dir=out, data=demo.DemoData(path=str(path)), only=["prep"]))
    assert done["data"] == str(path)
    from trainer.data.mds import LocalMDS

    rows = [r for split in ("train", "val", "test") if os.path.isdir(os.path.join(out, "text_shards", split))
            for r in (LocalMDS(os.path.join(out, "text_shards", split))[i]
                      for i in range(len(LocalMDS(os.path.join(out, "text_shards", split)))))]
    assert {r["source"] for r in rows} == {"jsonl"}                         # no bundled poem
    ode = sorted((r for r in rows if r["form"] == "ode"), key=lambda r: r["piece"])
    assert len(ode) > 1 and len({r["poem_id"] for r in ode}) == 1           # split, tied to its poem
    assert "".join(r["text"] + r["piece_sep"] for r in ode) == poems[-1]["text"]
    assert len([r for r in rows if r["form"] == "couplet"]) == 10


def test_a_bad_data_path_is_refused_before_any_work(tmp_path):
    import pytest

    from trainer.base.config import ConfigError

    with pytest.raises(ConfigError, match=r"^data.path: no such file or folder"):
        demo.run(demo.DemoConfig(out_dir=str(tmp_path / "demo"), data=demo.DemoData(path=str(tmp_path / "nope"))))
    assert not os.path.exists(tmp_path / "demo")
