"""Training data sources: WebDataset shards split over reading slots, sizes, resampling, resume, bad samples;
and the CSV/folder source's resume and smaller last batch.

Every sample carries a unique integer caption; the test tokenizer turns it into a one-number "token",
so a batch's ``texts`` say exactly which samples it holds, and the test transform returns the image's
mean and one draw of the sample's generator, so equal ``images`` mean equal augmentation seeds.
"""

from __future__ import annotations

import inspect
import io
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from shard_files import write_shard

from clipcli.errors import InputError
from clipcli.train.data import PairSource, read_pairs
from clipcli.train.shards import ShardSource, count_samples, shard_list, slot_shards
from clipcli.train.sources import open_source
from clipcli.webdataset import ShardError, samples


def ids(texts: list[str]) -> torch.Tensor:
    """The test tokenizer: caption "17" -> [[17]] (module level: data workers get it by fork or pickle)."""
    return torch.tensor([[int(text)] for text in texts])


def probe(image: Image.Image, generator: torch.Generator) -> torch.Tensor:
    """The test transform: the image's mean value and the first draw of the sample's generator."""
    mean = float(torch.frombuffer(bytearray(image.convert("L").tobytes()), dtype=torch.uint8).float().mean())
    return torch.tensor([mean, float(torch.rand(1, generator=generator))])


def png(size: int, value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, (value * 7) % 256, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def make_shards(folder: Path, sizes: list[int]) -> list[int]:
    """Shards ``00000.tar ..`` of ``sizes[i]`` samples (``KEY.png`` + ``KEY.txt``, 8..32 px); the ids they hold."""
    folder.mkdir(parents=True, exist_ok=True)
    every = []
    for number, size in enumerate(sizes):
        members = []
        for i in range(size):
            sample_id = number * 100 + i
            every.append(sample_id)
            members += [(f"{sample_id:06d}.png", png(8 + (sample_id % 4) * 8, sample_id)),
                        (f"{sample_id:06d}.txt", str(sample_id).encode())]
        write_shard(folder / f"{number:05d}.tar", members)
    return every


def source(folder: Path, shards: int, batch_size: int, rank: int = 0, world_size: int = 1, workers: int = 0,
           seed: int = 0, **options) -> ShardSource:
    pattern = str(folder / f"{{00000..{shards - 1:05d}}}.tar")
    return ShardSource(pattern, probe, ids, 77, batch_size, rank, world_size, seed, workers, **options)


def epoch(src, number: int = 0, start: int = 0) -> list:
    return list(src.batches(number, start))


def seen(batches) -> list[int]:
    return [int(t) for batch in batches for t in batch.texts[:, 0]]


# ----------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("slots", [1, 2, 3, 5])
def test_the_slots_shards_are_disjoint_and_hold_every_shard(tmp_path, slots):
    sizes = [3, 1, 4, 1, 5, 9, 2, 6]  # uneven
    every = make_shards(tmp_path, sizes)
    src = source(tmp_path, len(sizes), batch_size=slots * 2, world_size=slots)
    for number in range(2):
        lists = [slot_shards(src._plan, number, slot) for slot in range(slots)]
        read = [int(sample.caption) for shards in lists for shard in shards for sample in samples(shard)]
        assert sorted(read) == every  # no overlap, no gap
    assert [slot_shards(src._plan, 0, s) for s in range(slots)] != [slot_shards(src._plan, 1, s) for s in range(slots)] \
        or slots == len(sizes)  # a new order each epoch


@pytest.mark.parametrize(("slots", "batch_size"), [(1, 4), (2, 4), (3, 6), (6, 12)])
def test_an_epoch_over_equal_shards_reads_each_sample_exactly_once(tmp_path, slots, batch_size):
    every = make_shards(tmp_path, [4] * 6)
    per_rank = [source(tmp_path, 6, batch_size, rank=r, world_size=slots) for r in range(slots)]
    assert per_rank[0].steps_per_epoch == 24 // batch_size and per_rank[0].dropped_per_epoch == 0
    got = [id_ for r in range(slots) for id_ in seen(epoch(per_rank[r]))]
    assert sorted(got) == every


def test_one_process_with_two_workers_equals_two_processes_with_one(tmp_path):
    make_shards(tmp_path, [5, 3, 4, 6])
    one = epoch(source(tmp_path, 4, batch_size=5, workers=2), 1)
    ranks = [epoch(source(tmp_path, 4, batch_size=5, rank=r, world_size=2), 1) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 18 // 5
    for whole, first, second in zip(one, *ranks):
        assert len(first.texts) == 3 and len(second.texts) == 2  # n_s = 5 // 2, one more for slot 0
        assert torch.equal(whole.texts, torch.cat([first.texts, second.texts]))
        assert torch.equal(whole.images, torch.cat([first.images, second.images]))  # the same augmentation seeds


def test_batches_differ_by_epoch_and_seed_and_repeat_for_the_same(tmp_path):
    make_shards(tmp_path, [4, 4])
    first = seen(epoch(source(tmp_path, 2, batch_size=4)))
    assert seen(epoch(source(tmp_path, 2, batch_size=4))) == first
    assert seen(epoch(source(tmp_path, 2, batch_size=4), 1)) != first
    assert seen(epoch(source(tmp_path, 2, batch_size=4, seed=1))) != first


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("resampled", [False, True])
def test_a_resumed_epoch_gives_the_rest_of_the_uninterrupted_one(tmp_path, resampled):
    make_shards(tmp_path, [5, 7, 3])
    options = dict(num_samples=24, resampled=True) if resampled else {}
    whole = epoch(source(tmp_path, 3, batch_size=4, **options), 2)
    assert len(whole) == (24 if resampled else 15) // 4
    for start in (1, len(whole) - 1, len(whole)):
        tail = epoch(source(tmp_path, 3, batch_size=4, **options), 2, start)
        assert len(tail) == len(whole) - start
        for resumed, straight in zip(tail, whole[start:]):
            assert torch.equal(resumed.texts, straight.texts) and torch.equal(resumed.images, straight.images)


def make_pairs(folder: Path, count: int) -> Path:
    folder.mkdir()
    rows = ["filepath,title"]
    for i in range(count):
        Image.new("RGB", (8 + i % 3, 8), (i * 20, 0, 0)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{i}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def pair_source(csv: Path, rank: int = 0, world_size: int = 1, workers: int = 0, **options) -> PairSource:
    return PairSource(read_pairs(csv), probe, ids, 77, 4, rank, world_size, seed=5, workers=workers, **options)


def test_pairs_resume_mid_epoch_and_keep_a_smaller_last_batch_on_request(tmp_path):
    csv = make_pairs(tmp_path / "pairs", 10)
    src = pair_source(csv)
    whole = epoch(src, 1)
    assert (src.steps_per_epoch, src.samples_per_epoch, src.dropped_per_epoch) == (2, 8, 2) and len(whole) == 2
    in_workers = epoch(pair_source(csv, workers=2), 1)  # the same augmentation seeds in data workers
    assert all(torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts) for a, b in zip(in_workers, whole))
    tail = epoch(pair_source(csv), 1, start=1)
    assert len(tail) == 1 and torch.equal(tail[0].images, whole[1].images) and torch.equal(tail[0].texts, whole[1].texts)
    kept = pair_source(csv, drop_last=False)
    assert (kept.steps_per_epoch, kept.samples_per_epoch, kept.dropped_per_epoch) == (3, 10, 0)
    last = epoch(kept, 1)
    assert [len(b.texts) for b in last] == [4, 4, 2] and sorted(seen(last)) == list(range(10))
    assert torch.equal(epoch(kept, 1, start=2)[0].images, last[2].images)
    ranks = [epoch(pair_source(csv, rank=r, world_size=2, drop_last=False), 1) for r in range(2)]
    assert [len(b.texts) for b in ranks[0]] == [2, 2, 1] and [len(b.texts) for b in ranks[1]] == [2, 2, 1]
    for whole_batch, first, second in zip(last, *ranks):  # the same per-sample seeds on any rank
        assert torch.equal(whole_batch.images, torch.cat([first.images, second.images]))


# ----------------------------------------------------------------------------- resampling and sizes


def test_resampling_draws_shards_with_replacement_for_num_samples(tmp_path):
    make_shards(tmp_path, [4, 4, 4])
    src = source(tmp_path, 3, batch_size=4, resampled=True, num_samples=26)
    assert (src.steps_per_epoch, src.samples_per_epoch, src.dropped_per_epoch) == (6, 26, 2)
    drawn = seen(epoch(src))
    assert len(drawn) == 24 and max(Counter(drawn).values()) > 1  # 24 draws of 12 samples: repeats
    assert drawn == seen(epoch(source(tmp_path, 3, batch_size=4, resampled=True, num_samples=26)))
    assert drawn != seen(epoch(source(tmp_path, 3, batch_size=4, resampled=True, num_samples=26, seed=9)))
    # with resampling, two slots may share one shard
    assert len(epoch(source(tmp_path, 1, batch_size=4, workers=0, world_size=2, resampled=True, num_samples=8))) == 2
    with pytest.raises(InputError, match="number of samples"):
        source(tmp_path, 3, batch_size=4, resampled=True)


def test_sizes_come_from_sizes_json_then_stats_json_then_a_count(tmp_path):
    make_shards(tmp_path, [4, 3, 5])
    counted = source(tmp_path, 3, batch_size=2)
    assert counted.samples_per_epoch == 12 and "counted 12 samples in 3 shard(s)" in counted.notes[0]
    (tmp_path / "00001_stats.json").write_text(json.dumps({"successes": 30, "failed_to_download": 2}))
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 10}))
    mixed = source(tmp_path, 3, batch_size=2)
    assert mixed.samples_per_epoch == 10 + 30 + 5 and "counted 5 samples in 1 shard(s)" in mixed.notes[0]
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 4, "00001.tar": 3, "00002.tar": 5}))
    listed = source(tmp_path, 3, batch_size=2)
    assert listed.samples_per_epoch == 12 and listed.notes == []
    resampled = source(tmp_path, 3, batch_size=2, resampled=True)  # the sizes suffice
    assert resampled.samples_per_epoch == 12
    given = source(tmp_path, 3, batch_size=5, num_samples=7)
    assert (given.steps_per_epoch, given.dropped_per_epoch) == (1, 2)
    (tmp_path / "sizes.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="sizes.json"):
        source(tmp_path, 3, batch_size=2)


def test_uneven_shards_and_more_samples_than_held_are_noted(tmp_path):
    make_shards(tmp_path, [2, 10])
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 2, "00001.tar": 10}))
    uneven = source(tmp_path, 2, batch_size=4, world_size=2)
    assert any("differ in size" in note for note in uneven.notes)
    other = source(tmp_path, 2, batch_size=4, rank=1, world_size=2)
    read = Counter(seen(epoch(uneven)) + seen(epoch(other)))  # 3 batches of 2 + 2: the slot of the 2-sample shard reads it 3 times
    assert sum(read.values()) == 12 and read[0] == read[1] == 3 and max(read[i] for i in range(100, 110)) == 1
    more = source(tmp_path, 2, batch_size=4, num_samples=40)
    assert any("more than the shards hold" in note for note in more.notes)
    assert len(seen(epoch(more))) == 40 and max(Counter(seen(epoch(more))).values()) >= 3


def test_count_samples_agrees_with_the_reader(tmp_path):
    shard = write_shard(tmp_path / "odd.tar", [
        ("a/1.png", png(8, 1)), ("a/1.txt", b"1"), ("a/1.json", b"{}"), ("a/._1.png", b"mac"),
        ("b/2.txt", b"2"),  # no image: an error sample, counted as the reader gives it
        ("c/3.png", png(8, 3)), ("c/3.txt", b"3"), ("c/3.npy", b"x" * 5000)])
    assert count_samples(str(shard)) == len(list(samples(str(shard)))) == 3
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(shard.read_bytes()[:1100])  # cut inside the second member
    assert count_samples(str(damaged)) == len(list(samples(str(damaged))))
    with pytest.raises(ShardError):
        count_samples(str(tmp_path / "missing.tar"))


# ----------------------------------------------------------------------------- refusals and bad samples


def test_too_few_shards_or_too_small_a_batch_for_the_readers_is_refused(tmp_path):
    make_shards(tmp_path, [4, 4, 4])
    with pytest.raises(InputError, match="fewer than the 4 shard readers"):
        source(tmp_path, 3, batch_size=8, world_size=2, workers=2)
    with pytest.raises(InputError, match="smaller than the 3 shard readers"):
        source(tmp_path, 3, batch_size=2, workers=3)
    with pytest.raises(InputError, match="more than the 12 samples"):
        source(tmp_path, 3, batch_size=16)
    with pytest.raises(InputError, match="no shard matches"):
        source(tmp_path, 4, batch_size=4)
    empty = write_shard(tmp_path / "empty.tar", [])
    with pytest.raises(InputError, match="hold no samples"):  # never a reader looping forever
        epoch(ShardSource(str(empty), probe, ids, 77, 2, 0, 1, 0, 0, num_samples=4))


def test_bad_samples_are_skipped_and_reported_and_count_as_read(tmp_path):
    good = [(f"{i:02d}.png", png(16, i)) for i in range(3)]
    write_shard(tmp_path / "00000.tar", [
        good[0], ("00.txt", b"0"),
        ("01.jpg", b"not a jpeg"), ("01.txt", b"1"),  # undecodable
        good[2], ("02.txt", b"   "),  # no caption
        ("03.txt", b"3"),  # no image
        ("04.png", png(8, 4)), ("04.txt", b"4")])
    src = ShardSource(str(tmp_path / "00000.tar"), probe, ids, 77, 5, 0, 1, 0, 0)
    (batch,) = epoch(src)
    assert sorted(seen([batch])) == [0, 4] and batch.images.shape == (2, 2)
    reasons = dict(batch.skipped)
    assert len(reasons) == 3 and all(name.startswith(str(tmp_path / "00000.tar") + ":") for name in reasons)
    assert "no caption" in reasons[f"{tmp_path / '00000.tar'}:02"] and "no image" in reasons[f"{tmp_path / '00000.tar'}:03"]
    assert "not an image" in reasons[f"{tmp_path / '00000.tar'}:01"]


def test_a_damaged_shard_gives_an_error_sample_and_a_vanished_one_stops_the_run(tmp_path):
    make_shards(tmp_path, [4, 4])
    noise = io.BytesIO()
    Image.frombytes("L", (64, 64), bytes(range(256)) * 16).save(noise, "PNG")
    write_shard(tmp_path / "00001.tar", [("000100.txt", b"100"), ("000100.png", png(8, 100)),
                                         ("000101.txt", b"101"), ("000101.png", noise.getvalue())])
    whole = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(whole[: 7 * 512 + len(noise.getvalue()) // 2])  # in the noise's data
    src = source(tmp_path, 2, batch_size=4, num_samples=8)
    skipped = [entry for batch in epoch(src) for entry in batch.skipped]
    assert any("damaged after 000100" in reason for _, reason in skipped)
    (tmp_path / "00000.tar").unlink()
    with pytest.raises(ShardError, match="cannot read shard"):
        epoch(src)
    in_worker = ShardSource(str(tmp_path / "00001.tar"), probe, ids, 77, 2, 0, 1, 0, 1, num_samples=4)
    (tmp_path / "00001.tar").unlink()
    with pytest.raises(ShardError, match="cannot read shard"):  # raised as itself from a data worker
        epoch(in_worker)


# ----------------------------------------------------------------------------- choosing the source


def test_open_source_picks_shards_or_pairs_and_refuses_shard_options_on_a_table(tmp_path):
    make_shards(tmp_path / "shards", [4, 4])
    csv = make_pairs(tmp_path / "pairs", 6)
    common = dict(img_key="filepath", caption_key="title", transform=probe, tokenize=ids, context_length=77,
                  batch_size=4, rank=0, world_size=1, seed=0, workers=0)
    shards = open_source(str(tmp_path / "shards" / "{00000..00001}.tar"), **common)
    assert isinstance(shards, ShardSource) and shards._plan.caption_key == "txt" and shards.samples_per_epoch == 8
    both = open_source(str(tmp_path / "shards" / "00000.tar") + "::" + str(tmp_path / "shards" / "00001.tar"), **common)
    assert both.shards == shard_list(str(tmp_path / "shards" / "0000[01].tar"))
    assert isinstance(open_source(str(csv), **common), PairSource)
    with pytest.raises(InputError, match="train_num_samples"):
        open_source(str(csv), **common, num_samples=10)
    with pytest.raises(InputError, match="dataset_resampled"):
        open_source(str(csv), **common, resampled=True)
    with pytest.raises(InputError, match="more than the 6 pairs"):
        open_source(str(csv), **{**common, "batch_size": 8})


def test_a_real_transform_and_tokenizer_give_model_ready_batches(tmp_path):
    from clipcli.train.augment import train_transform
    from clipcli.train.data import CaptionTokenizer
    from clipcli.train.model import model_config

    make_shards(tmp_path, [3, 3])
    config = model_config("tiny", {}, None, None)
    src = ShardSource(str(tmp_path / "{00000..00001}.tar"), train_transform(config, {}), CaptionTokenizer(77), 77,
                      6, 0, 1, 0, 0)
    (batch,) = epoch(src)
    assert batch.images.shape == (6, 3, 32, 32) and batch.texts.shape == (6, 77) and batch.texts.dtype == torch.long


@pytest.mark.skipif("caption" not in inspect.signature(samples).parameters,
                    reason="clipcli.webdataset.samples() reads .txt captions only")
def test_another_caption_extension(tmp_path):
    write_shard(tmp_path / "00000.tar", [("0.png", png(8, 0)), ("0.txt", b"7"), ("0.cap", b"0"),
                                         ("1.png", png(8, 1)), ("1.cap", b"1")])
    src = ShardSource(str(tmp_path / "00000.tar"), probe, ids, 77, 2, 0, 1, 0, 0, caption_key=".CAP")
    assert sorted(seen(epoch(src))) == [0, 1]
