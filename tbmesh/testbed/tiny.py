"""A small random-weight model of a real architecture, in mlx-lm's directory format.

No model can be downloaded on the machines that test tbmesh, so tests and demos make one:
mlx-lm's own model class built from a config, random weights scaled so activations stay
sane over many layers, and a byte-level BPE tokenizer trained here with `tokenizers` on an
English text kept in this module. `mlx_lm.load(DIR)` loads the result unchanged, so the
loading code is the same real code a Mac runs on a real checkpoint. Taught (`teach`, see
tbmesh.testbed.teach), the weights are trained until its greedy answers are the taught ones.

The same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_lm.utils import _get_classes  # applies MODEL_REMAPPING, as mlx_lm.load does
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tbmesh.runtime.shapes import _cast
from tbmesh.testbed.sizes import ARCHITECTURES, DTYPES, HEAD_DIM, RANDOM_SIZES, TAUGHT_SIZES
from tbmesh.testbed.teach import check_conversation, corpus_texts, first_wrong, taught_answers, train

MAX_POSITIONS = 4096
LOGIT_STD = 2.0  # peaked enough that sampling is not uniform noise, flat enough to vary

BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END)
# Qwen3's added tokens around a reasoning, a tool call and a tool's result: single tokens (not
# special: a decoded answer keeps them), from which mlx-lm's tokenizer wrapper infers thinking
MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
# Qwen3's chat template after the BOS token (as Llama 3's starts): ChatML turns, `tools` in the
# system turn, <tool_call> JSON in assistant turns (mlx-lm infers its json_tools parser from
# "<tool_call>" and "tool_call.name" here), tool results in a user turn. Unlike Qwen3's, it
# writes no empty think block and has no enable_thinking switch: a turn shows a reasoning only
# where it has one, and only after the last user message (earlier turns lose theirs, as in Qwen3).
CHAT_TEMPLATE = """\
{{- bos_token }}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- '\\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if reasoning.strip('\\n') and loop.index0 > ns.last_user %}
            {{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- content }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if content or not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {{- tool_call.arguments if tool_call.arguments is string else tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # with split weights (max_shard_bytes)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FILES = (WEIGHTS_FILE, "config.json", *TOKENIZER_FILES)
# Files of another model that mlx-lm or transformers would read along with ours (all the
# weights, a generation config's EOS, a chat template file) and so are removed by `force`.
STALE = ("model*.safetensors", "model.safetensors.index.json", "generation_config.json", "chat_template.jinja",
         "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "*.tiktoken")  # fmt: skip


def make_tiny_model(
    path: str | Path,
    *,
    arch: str = ARCHITECTURES[0],
    layers: int | None = None,
    hidden: int | None = None,
    vocab: int | None = None,
    seed: int = 0,
    dtype: str = DTYPES[0],
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    experts: int = 8,
    experts_per_token: int = 2,
    tie_embeddings: bool = False,
    early_end: bool = False,
    teach: list[dict[str, Any]] | None = None,
    max_shard_bytes: int | None = None,
    force: bool = False,
) -> Path:
    """Write a random-weight `arch` model and its tokenizer into `path`; returns `path`.

    Sizes left out are RANDOM_SIZES' (TAUGHT_SIZES' with `teach`); `heads` defaults to
    hidden / 64, `kv_heads` to half of them (grouped-query attention), `intermediate` to
    3 x hidden; `experts` apply to qwen3_moe only. `early_end`: greedy answers soon meet
    <|end_of_text|>, the end id config.json lists beside the tokenizer's own (<|im_end|>), as
    instruct models do: a test that a server stops on every end id.
    `teach`: conversations (tbmesh.testbed.teach.CONVERSATIONS, or read_conversations(FILE))
    the model is trained on until mlx-lm's greedy decoding gives each of their assistant
    turns; the tokenizer learns their words and has Qwen3's think and tool-call tokens.
    `max_shard_bytes`: split the weights into files of at most that many bytes of tensors and
    an index, as mlx_lm.convert writes big models (see save_weights); default: one file.
    Raises ValueError on bad sizes, a bad conversation or a failed teaching, and
    FileExistsError when `path` already holds files, unless `force`.
    """
    root = Path(path)
    sizes = RANDOM_SIZES if teach is None else TAUGHT_SIZES
    layers = sizes["layers"] if layers is None else layers
    hidden = sizes["hidden"] if hidden is None else hidden
    vocab = sizes["vocab"] if vocab is None else vocab
    heads = sizes.get("heads", max(1, hidden // HEAD_DIM)) if heads is None else heads
    kv_heads = sizes.get("kv_heads", max(1, heads // 2)) if kv_heads is None else kv_heads
    intermediate = sizes.get("intermediate", 3 * hidden) if intermediate is None else intermediate
    _check(arch, layers, hidden, vocab, dtype, heads, kv_heads, intermediate, experts, experts_per_token)
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError("max_shard_bytes must be at least 1")
    if teach is not None:
        _check_teaching(teach, vocab, early_end)
    _prepare_dir(root, force)
    if teach is None:
        tokenizer = train_tokenizer(vocab)
    else:  # the words of the conversations and of the template (role names, tool instructions)
        tokenizer = train_tokenizer(vocab, corpus_texts(teach) + [CHAT_TEMPLATE], markers=True)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    config = tiny_config(arch, layers, hidden, vocab, heads, kv_heads, intermediate, dtype, ids, tie_embeddings)
    if arch == "qwen3_moe":
        config.update(num_experts=experts, num_experts_per_tok=experts_per_token, moe_intermediate_size=intermediate)
    _write_json(root / "config.json", config)
    write_tokenizer(root, tokenizer)
    if teach is None:
        weights = random_weights(config, seed, dtype)
    else:
        try:
            weights = taught_weights(root, config, seed, dtype, teach)
        except BaseException:  # a failed teaching, ^C: no half-made model is left behind
            for name in FILES:
                (root / name).unlink(missing_ok=True)
            raise
    if early_end:
        _favour_token(weights, ids[EOS])
    save_weights(root, weights, max_shard_bytes)
    return root


def save_weights(root: Path, weights: dict[str, mx.array], max_shard_bytes: int | None = None) -> None:
    """model.safetensors, or with `max_shard_bytes` mlx_lm.save_model's split layout: files
    model-00001-of-0000N.safetensors of consecutive tensors (a tensor larger than the limit
    gets a file of its own) and model.safetensors.index.json mapping each tensor to its file."""
    if max_shard_bytes is None:
        mx.save_safetensors(str(root / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
        return
    shards: list[dict[str, mx.array]] = []
    size = 0
    for name, value in weights.items():  # the model's order: embedding, layer 0, 1, ..., head
        if not shards or size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(root / file), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(v.nbytes for v in weights.values())
    _write_json(root / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def taught_weights(root: Path, config: dict[str, Any], seed: int, dtype: str,
                   conversations: list[dict[str, Any]]) -> dict[str, mx.array]:  # fmt: skip
    """The random weights of `seed`, trained until greedy decoding gives every taught answer.

    The tokenizer is read from `root` by mlx-lm, so the answers are tokenized by the chat
    template and the code that later serve them. Trained in float32; the answers are checked
    again in `dtype`.
    """
    tokenizer = load_tokenizer(root)
    answers = taught_answers(tokenizer, conversations)
    model = _model(config)
    model.update(tree_unflatten(list(random_weights(config, seed, "float32").items())))
    train(model, answers)
    if dtype != "float32":
        _cast(model, getattr(mx, dtype))
        if (wrong := first_wrong(model, answers)) is not None:
            raise ValueError(f"in {dtype}, greedy decoding misses the taught answer {answers[wrong].text[:40]!r}: "
                             "use float32")
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    return weights


def _check(
    arch: str, layers: int, hidden: int, vocab: int, dtype: str,
    heads: int, kv_heads: int, intermediate: int, experts: int, experts_per_token: int,
) -> None:  # fmt: skip
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if min(layers, hidden, heads, kv_heads, intermediate, experts, experts_per_token) < 1:
        raise ValueError("layers, hidden, heads, kv_heads, intermediate and experts must be at least 1")
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} must split into {heads} heads, and those into {kv_heads} KV heads")
    if (hidden // heads) % 2:
        raise ValueError(f"head size {hidden // heads} is odd: rotary embeddings turn pairs of values")
    if experts_per_token > experts:
        raise ValueError(f"{experts_per_token} experts per token but only {experts} experts")
    smallest = 256 + len(SPECIAL_TOKENS)  # every byte, then the special tokens
    if vocab < smallest:
        raise ValueError(f"vocab {vocab} is too small: a byte-level tokenizer needs at least {smallest}")


def _check_teaching(conversations: list[dict[str, Any]], vocab: int, early_end: bool) -> None:
    if early_end:
        raise ValueError("a taught model cannot also end early: its answers end where they were taught to")
    smallest = 256 + len(SPECIAL_TOKENS) + len(MARKERS)
    if vocab < smallest:
        raise ValueError(f"vocab {vocab} is too small: a taught model's tokenizer needs at least {smallest}")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("no conversation to teach")
    for i, conversation in enumerate(conversations):
        check_conversation(conversation, f"conversation {i + 1}")


def _prepare_dir(root: Path, force: bool) -> None:
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not force:
            raise FileExistsError(f"{root} is not empty")
        for pattern in STALE:
            for stale in root.glob(pattern):
                stale.unlink()
    root.mkdir(parents=True, exist_ok=True)


# --- config and weights ------------------------------------------------------------------


def tiny_config(
    arch: str, layers: int, hidden: int, vocab: int, heads: int, kv_heads: int,
    intermediate: int, dtype: str, ids: dict[str, int], tie_embeddings: bool,
) -> dict[str, Any]:  # fmt: skip
    """config.json as the real checkpoints of `arch` have it (Llama 3.1, Qwen3, Qwen3-MoE)."""
    config: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                           "qwen3_moe": "Qwen3MoeForCausalLM"}[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "vocab_size": vocab,
        "attention_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": ids[BOS],
        "eos_token_id": [ids[EOS], ids[IM_END]],  # a list, as instruct models give theirs
        "tie_word_embeddings": tie_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
    }  # fmt: skip
    if arch == "llama":
        config.update(rms_norm_eps=1e-5, rope_theta=500000.0, mlp_bias=False, pretraining_tp=1)
    else:
        config.update(rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False,
                      sliding_window=None, max_window_layers=layers)  # fmt: skip
    if arch == "qwen3_moe":
        config.update(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                      output_router_logits=False, router_aux_loss_coef=0.001)  # fmt: skip
    return config


def random_weights(config: dict[str, Any], seed: int, dtype: str) -> dict[str, mx.array]:
    """The parameters of mlx-lm's model for `config`, drawn from `seed`, evaluated.

    Each tensor gets its own key split from the seed, so a tensor's values do not depend on
    the order or the sizes of the others.
    """
    mx.random.seed(seed)
    model = _model(config)  # lazy: its own random init is never run
    initial = dict(tree_flatten(model.parameters()))
    names = sorted(initial)
    keys = mx.random.split(mx.random.key(seed), len(names))
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    tied = config["tie_word_embeddings"]
    weights = {name: _draw(name, initial[name], keys[i], layers, hidden, tied) for i, name in enumerate(names)}
    model.update(tree_unflatten(list(weights.items())))
    _cast(model, getattr(mx, dtype))  # as mlx_lm.convert casts (router weights may stay float32)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    return weights


def _model(config: dict[str, Any]) -> nn.Module:
    """mlx-lm's model class for `config`, as mlx_lm.load builds it."""
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def _draw(name: str, init: mx.array, key: mx.array, layers: int, hidden: int, tied: bool) -> mx.array:
    """Random values that keep activations near unit size through any number of layers."""
    if init.ndim == 1:
        return init  # norm weights (ones): as a fresh model has them
    if name.endswith("embed_tokens.weight"):
        # tied: the same matrix makes the logits, so it is sized for them
        std = LOGIT_STD / math.sqrt(hidden) if tied else 1.0
    elif name.startswith("lm_head."):
        std = LOGIT_STD / math.sqrt(hidden)  # its input is normalized: logits get std LOGIT_STD
    else:
        std = 1 / math.sqrt(init.shape[-1])  # variance-preserving over the input size
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            std /= math.sqrt(2 * layers)  # each of 2 x layers writes into the residual (GPT-2)
    return mx.random.normal(init.shape, dtype=mx.float32, key=key) * std


def _favour_token(weights: dict[str, mx.array], token: int) -> None:
    """Scale `token`'s output row: its logit, 8 times as spread, leads a third of the time."""
    name = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
    matrix = weights[name]
    weights[name] = mx.concatenate([matrix[:token], matrix[token : token + 1] * 8, matrix[token + 1 :]])
    mx.eval(weights[name])


# --- tokenizer ----------------------------------------------------------------------------


def train_tokenizer(vocab: int, texts: list[str] | None = None, markers: bool = False) -> Tokenizer:
    """A byte-level BPE (as GPT-2 and Llama 3) trained on `texts` (the paragraphs of CORPUS
    by default), with exactly `vocab` tokens.

    Learned tokens come first, then the special tokens, then (`markers`) Qwen3's think and
    tool-call tokens; when the texts run out of merges before `vocab`, reserved special
    tokens fill the rest (as Llama 3's do), so every id the model can produce decodes.
    """
    added = MARKERS if markers else ()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - len(SPECIAL_TOKENS) - len(added),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text encodes, byte by byte
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.split("\n\n") if texts is None else texts, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # not special, as Qwen3's: an answer decoded with skip_special_tokens keeps them
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    reserved = vocab - tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(reserved)])
    # BOS on every encoded text, as Llama 3's tokenizer adds it
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return tokenizer


def write_tokenizer(root: Path, tokenizer: Tokenizer) -> None:
    """tokenizer.json plus the two files transformers' AutoTokenizer reads next to it."""
    tokenizer.save(str(root / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": IM_END, "pad_token": EOS}
    _write_json(root / "special_tokens_map.json", special)
    _write_json(
        root / "tokenizer_config.json",
        {
            # the generic class: the tokenizer.json alone defines the tokenizer
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POSITIONS,
            "chat_template": CHAT_TEMPLATE,
        },
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# --- the training text --------------------------------------------------------------------

# Written for tbmesh (no copyright concerns); paragraphs are separated by blank lines.
CORPUS = """\
The cluster starts when the first cable is plugged in. Each Mac runs a small daemon that \
listens on the Thunderbolt port, finds its neighbours, and measures how fast the link is. \
When two machines agree on a leader, the leader splits the model into stages and sends \
each machine the layers it should hold.

A model is a long stack of layers. The first layer turns words into numbers, the last one \
turns numbers back into words, and every layer in between changes the numbers a little. \
If one computer cannot hold all of the layers, several computers can each hold a part, and \
the numbers travel from one to the next like water through a chain of pipes.

The river was wide and slow in the morning. A heron stood in the shallow water near the \
bank, and the light came through the trees in long yellow lines. Two boys walked along the \
path with a dog that kept running ahead and coming back, as if to make sure they were \
still there.

She opened the window and listened. The street was quiet except for a bicycle bell and the \
sound of someone sweeping a step. It had rained during the night, and the air smelled of \
wet stone and bread from the bakery on the corner.

To make soup, cut two onions, three carrots and a few potatoes into small pieces. Warm some \
oil in a large pot, add the onions, and stir them until they are soft. Add the rest of the \
vegetables, cover them with water, add salt and pepper, and let the pot simmer for forty \
minutes.

Good tools are simple to use and hard to misuse. They say what they do, they fail with a \
clear message, and they never lose your work. A good error message tells you what went \
wrong, why it went wrong, and what you can do about it.

In the year 1879 the town had four hundred people, one school, two churches and a mill. By \
1920 it had grown to nearly three thousand. The railway brought visitors in the summer, and \
the old mill became a hotel with twenty rooms and a view of the lake.

How many machines do you need? Add up the memory of every layer, add room for the cache, \
and divide by the memory each machine can give. If the answer is 2.6, you need three \
machines. If a machine leaves, the others must hold its layers, or the model must wait \
until it comes back.

The teacher wrote a question on the board: what is the difference between speed and \
bandwidth? One student said that speed is how fast a single message arrives, and bandwidth \
is how much can arrive in one second. The teacher smiled and said that was close enough \
for a Monday.

Winter came early that year. The first snow fell in the middle of October, and by November \
the lake was frozen near the shore. People skated in the evenings under the lamps, and the \
children built a small house of snow behind the school.

The old clock in the hall had stopped at a quarter past nine. Nobody knew when it had \
stopped or why, and nobody wanted to wind it, because everyone had grown used to the \
silence where the ticking used to be.

When you write a test, make it fast, make it fail for one reason, and make the reason easy \
to read. A test that passes on Monday and fails on Tuesday without any change is worse than \
no test at all, because it teaches people to ignore failures.

A small garden needs sun, water and patience. Plant beans in the spring, tomatoes when the \
nights are warm, and garlic in the autumn. Pull the weeds while they are young, and the \
garden will give you more than you can eat.

The ship left the harbour at dawn with eleven sailors, a cook, a cat and enough food for \
sixty days. The wind was steady from the west, and by noon the coast was only a thin grey \
line behind them.

Numbers are easy to read when they have units: 64 GB of memory, 80 Gb/s over the cable, 12 \
ms per token, 3 machines in a ring. Without units, a number is only half of an answer.

She asked him what he wanted to do next. He thought for a long time, looked at the map on \
the wall, and said that he wanted to see the mountains in the north before he was too old \
to climb them.
"""
