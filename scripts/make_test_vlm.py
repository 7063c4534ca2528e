#!/usr/bin/env python3
"""Deterministic random-weight vision-language models for llama-server tests and benchmarks.

Writes, for one architecture and size, a text-model GGUF and an mmproj GGUF that the stock
llama-server loads with ``-m model.gguf --mmproj mmproj.gguf``::

    python scripts/make_test_vlm.py --arch gemma3 --size tiny --seed 0 --out models/
    python scripts/make_test_vlm.py --all --out models/                  # every tiny model
    python scripts/make_test_vlm.py --all --size realistic --out models/

Output: ``OUT/<arch>-<size>/{model.gguf,mmproj.gguf,manifest.json}``. A directory whose
manifest records the same seed, parameters and generator version is left alone.

Architectures (they place images differently, which is why both exist):

* ``gemma3``: text arch ``gemma3`` + projector ``gemma3`` (SigLIP, 2-D average pool,
  linear projection). Fixed image size, so a fixed token count; mtmd decodes image tokens
  with non-causal attention.
* ``qwen2vl``: text arch ``qwen2vl`` + projector ``qwen2vl_merger``. Dynamic resolution,
  so the token count follows the image's size and aspect ratio; M-RoPE positions come
  from the image grid.

Sizes: ``tiny`` (tests; f32, ~11 MB per model, milliseconds per image) and ``realistic``
(benchmarks; f16, real vision towers and real text width, shallow text model). f16 because
on CPU f32 measured no faster and bf16 slower, and real mmproj files are f16.

Serve with, e.g.::

    llama-server -m DIR/model.gguf --mmproj DIR/mmproj.gguf -t 2 -c 4096 -np 1 --temp 0

Random weights are shaped so that greedy output depends on the image (see
``Shaping``); naive random weights answer the same whatever the image. The vocabulary
holds the family's special tokens, byte fallback and ~2,500 whole English words; the
chat template is the family's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import numpy.typing as npt

# Bump whenever the output for a given (arch, size, seed) changes, so cached models regenerate.
GENERATOR_VERSION = 1

Arch = Literal["gemma3", "qwen2vl"]
Size = Literal["tiny", "demo", "realistic"]
ARCHS: tuple[Arch, ...] = ("gemma3", "qwen2vl")
SIZES: tuple[Size, ...] = ("tiny", "demo", "realistic")

F32Array = npt.NDArray[np.float32]


# --------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSpec:
    """Text decoder hyper-parameters (only ``n_embd`` must match the real model)."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx: int
    rope_base: float
    rope_sections: tuple[int, ...] = ()  # qwen2vl M-RoPE split of head_dim / 2
    sliding_window: int = 0  # gemma3 local-attention window


@dataclass(frozen=True)
class VisionSpec:
    """Vision tower hyper-parameters."""

    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    patch_size: int
    image_size: int  # gemma3: the fixed input size; qwen2vl: only used for warm-up
    n_merge: int  # gemma3: pooling kernel per side; qwen2vl: spatial merge per side


@dataclass(frozen=True)
class ModelSpec:
    arch: Arch
    size: Size
    text: TextSpec
    vision: VisionSpec
    # Storage type of weight matrices; norms, biases and position embeddings stay f32.
    # f32 for tiny models (exact, and tiny matmuls gain nothing from f16); f16 for the
    # realistic ones, halving the bytes streamed per matmul on CPU, like real GGUFs.
    matrix_type: Literal["f32", "f16"]


@dataclass(frozen=True)
class Shaping:
    """How the random weights are scaled so that greedy output depends on the image.

    Naive random weights give the same greedy tokens whatever the image: attention is
    diffuse, every image token looks alike after a deep tower, and a few tokens win every
    argmax. Each knob below undoes one of those effects.
    """

    # Text attention logits have std ~= qk_gain**2: the last prompt token reads a few
    # specific image tokens instead of their average.
    qk_gain: float = 2.0
    # V and O scale (qwen2vl) / post-attention norm weight (gemma3): the attention output
    # outweighs the current token's own embedding in the residual stream.
    vo_gain: float = 1.5
    gemma_post_attn_gain: float = 2.0
    # The FFN maps the current token to its own random direction, so the next word depends
    # on the current one as well as on the image: without it generation falls into a
    # fixed point ("hound hound hound") once the image readout dominates.
    ffn_gain: float = 1.0
    # Untied output: whole-word rows give logits with this std; everything else (EOS,
    # bytes, fragments, specials) is near zero so they never win greedy decoding.
    word_logit_std: float = 5.0
    minor_logit_std: float = 0.05
    # Newline (the last prompt token of both templates) embeds near zero, so its residual
    # is mostly what attention read from the image.
    quiet_token_scale: float = 0.1
    # Vision residual branches are scaled by this / sqrt(layers): deep towers keep
    # patches apart instead of blurring them together.
    vision_residual: float = 0.7
    position_std: float = 0.3
    patch_gain: float = 2.0
    # qwen2vl merger: GELU input shifted by this, so it stays near-linear; the second
    # bias cancels the shift, or every image token would get the same large offset.
    merger_gelu_shift: float = 3.0


def _tiny(arch: Arch) -> ModelSpec:
    if arch == "gemma3":
        text = TextSpec(n_embd=128, n_layer=2, n_head=4, n_head_kv=2, head_dim=32, n_ff=384,
                        n_ctx=8192, rope_base=1_000_000.0, sliding_window=1024)
        # 224 px / 14 = 16x16 patches, 2x2 pooling -> 64 image tokens.
        vision = VisionSpec(n_embd=128, n_layer=2, n_head=4, n_ff=320, patch_size=14,
                            image_size=224, n_merge=2)
    else:
        text = TextSpec(n_embd=128, n_layer=2, n_head=4, n_head_kv=2, head_dim=32, n_ff=384,
                        n_ctx=8192, rope_base=1_000_000.0, rope_sections=(4, 6, 6, 0))
        # 28 px patches (real: 14) keep dynamic-resolution images at ~80-100 tokens.
        vision = VisionSpec(n_embd=64, n_layer=2, n_head=4, n_ff=160, patch_size=28,
                            image_size=560, n_merge=2)
    return ModelSpec(arch=arch, size="tiny", text=text, vision=vision, matrix_type="f32")


def _realistic(arch: Arch) -> ModelSpec:
    if arch == "gemma3":
        # Gemma 3 4B text width; SigLIP-so400m at 896 px -> 64x64 patches, 4x4 pool -> 256.
        text = TextSpec(n_embd=2560, n_layer=2, n_head=8, n_head_kv=4, head_dim=256,
                        n_ff=10240, n_ctx=32768, rope_base=1_000_000.0, sliding_window=1024)
        vision = VisionSpec(n_embd=1152, n_layer=27, n_head=16, n_ff=4304, patch_size=14,
                            image_size=896, n_merge=4)
    else:
        # Qwen2-VL-7B: text width 3584 (M-RoPE 16/24/24), ViT 1280 x 32, merger -> 3584.
        text = TextSpec(n_embd=3584, n_layer=2, n_head=28, n_head_kv=4, head_dim=128,
                        n_ff=18944, n_ctx=32768, rope_base=1_000_000.0,
                        rope_sections=(16, 24, 24, 0))
        vision = VisionSpec(n_embd=1280, n_layer=32, n_head=16, n_ff=5120, patch_size=14,
                            image_size=560, n_merge=2)
    return ModelSpec(arch=arch, size="realistic", text=text, vision=vision, matrix_type="f16")


def model_spec(arch: Arch, size: Size) -> ModelSpec:
    """The preset for one architecture and size."""
    if size == "tiny":
        return _tiny(arch)
    return _demo(arch) if size == "demo" else _realistic(arch)


def _demo(arch: Arch) -> ModelSpec:
    """`make demo`: the realistic widths and image size with a shallow vision tower.

    The encoder still dominates time to first token, as in real models, but one encode takes
    seconds instead of most of a minute on 2 cores (6 of SigLIP-so400m's 27 layers). The
    text model keeps its width (so packages have their real size) with a narrower FFN, so
    that a hit shows what the encoder cost rather than a slow 2-layer prompt pass.
    """
    real = _realistic(arch)
    vision = dataclasses.replace(real.vision, n_layer=6)
    text = dataclasses.replace(real.text, n_ff=real.text.n_embd)
    return dataclasses.replace(real, size="demo", vision=vision, text=text)


# clip.cpp's token limits for Qwen2-VL images (set_limit_image_tokens(8, 4096)).
_QWEN2VL_MIN_TOKENS, _QWEN2VL_MAX_TOKENS = 8, 4096


def expected_image_tokens(arch: Arch, size: Size, width: int, height: int) -> int:
    """Embedding tokens mtmd produces for a ``width`` x ``height`` image (default limits).

    gemma3 resizes every image to a fixed square, so the count is constant. qwen2vl keeps
    the aspect ratio, rounds each side to a multiple of patch*merge, and rescales into the
    [8, 4096]-token budget (mirrors ``calc_size_preserved_ratio`` in mtmd-image.cpp).
    """
    v = model_spec(arch, size).vision
    if arch == "gemma3":
        return (v.image_size // v.patch_size // v.n_merge) ** 2
    align = v.patch_size * v.n_merge
    min_pixels = _QWEN2VL_MIN_TOKENS * align * align
    max_pixels = _QWEN2VL_MAX_TOKENS * align * align
    w_bar = max(align, math.floor(width / align + 0.5) * align)  # std::round: half away
    h_bar = max(align, math.floor(height / align + 0.5) * align)
    if w_bar * h_bar > max_pixels:
        beta = math.sqrt(width * height / max_pixels)
        w_bar = max(align, math.floor(width / beta / align) * align)
        h_bar = max(align, math.floor(height / beta / align) * align)
    elif w_bar * h_bar < min_pixels:
        beta = math.sqrt(min_pixels / (width * height))
        w_bar = math.ceil(width * beta / align) * align
        h_bar = math.ceil(height * beta / align) * align
    return (w_bar // align) * (h_bar // align)


# --------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------

# Whole words the model can say. Readable output beats realistic statistics here.
_WORDS = """
abandon able about above absent absorb abstract academy accent accept access accident account
accurate achieve acid acorn acquire across act action active activity actor actual adapt add
address adjust admire adopt adult advance adventure advice affair affect afford afraid after
again against age agency agenda agent ago agree air aircraft airport alarm album alcohol alert
alien alive all alley allow almost alone along alpha already also alter always amaze amber among
amount amuse analyze ancestor anchor ancient and angel anger angle angry animal ankle annual
answer antenna anvil anxious any apart apology apparent appeal appear applaud apple apply
appoint approach approve apron arch are area arena argue arise arm armor army around arrange
arrest arrive arrow art artist artwork as ask aspect assemble asset assist assume at atom attach
attack attempt attend attic attract auction audience audio aunt author autumn available avenue
average avoid awake award aware away awesome awful awkward baby back bad badge bag bait bake
balance balcony ball balloon bamboo banana band bank banner bar bargain barn barrel barrier base
basic basin basket bat bath bathroom battle bay be beacon beam bean bear beard beat beauty
become bed bedroom bee beef been beetle before begin begun behave behind belief believe bell
belong below belt bench bend beneath benefit berry beside best better between beyond bicycle big
billion biology bird birth bishop bit bite black blade blank blanket blast blaze blend blind
blink bliss block blood bloom blossom blow blue bluff blunt blur board boast boat body boil bold
bolt bone bonus book boost boot booth border born borrow both bottle bottom bought bounce
boundary bounty bowl box boy bracelet bracket brain brake branch brass brave bread break
breakfast breath breathe breed breeze brick bridge brief bright brilliant brim bring brisk broad
broke broken bronze brook broom brother brown brunch brush bubble bucket buddy budget buffalo
buffet build building bulb bulk bullet bundle bunny burden burn burst bus bush busy but butler
butter button buy by cabbage cabin cable cactus cage cake calculate calendar call calm camel
camera camp campus can canal candidate candle candy cannon canoe canvas canyon cap capable
capital captain capture car card care careful cargo carnival carpet carrot carry cart cartoon
carve cascade case cashew castle casual cat catalog catch category cattle cause caution cave
cedar ceiling celebrate cell cellar cement cent center cereal ceremony certain chain chair chalk
chamber champion chance change channel chaos chapel chapter charge charity charm chart chase
cheap check cheek cheerful cheese chemical cherry cherub chest chicken chief child chime chimney
chin chocolate choice choose chorus church cider cinema circle circuit citizen citrus city civic
civil claim clam clamp clasp class classic clay clean clear clerk clever click client cliff
climate climb clinic cloak clock close closet cloth cloud clover clown club clumsy cluster coach
coal coast coastal coat coconut code coffee coin cold collapse collar collect colony color
colorful column comb combine come comet comfort comic command comment commerce common company
compare compass complete complex concept concert condor conduct confirm connect consider
constant contact contain content contest continue control convert cookie cooking cooperate
copper copy coral cord cork corn corner correct cosmic cost costly costume cottage cotton couch
cougar could count counter country couple courage course courtyard cousin cover cow crab crack
craft crane crash crater crayon crazy cream create creature credit creek crest crew cricket
crimson crisp crispy critic crop cross crowd crown crucial crunchy cry crystal cube cuckoo
cucumber cuddle cultural cup cupboard cupcake curious curly current cursor curtain curve cushion
custom customer cut cyan cycle dagger daily dairy daisy damage damp dance dancer dancing danger
daring dark dart date daughter dawn day dazzle dead deal dear debt debut decade decent decide
decimal declare decorate decoy decrease deep deer defend define degree delicate delight deliver
delta demand denim dense depend deposit depot depth derby describe desert deserve design desire
desk dessert destroy detail detect develop device devote dew diagram dial diamond diary
dictionary did diesel differ digit digital dime dinner dinosaur diploma dipper direct dirt
discover discuss disease dish disk display distance distant divide dock doctor document dog doll
dollar dolphin domain dome domestic donate donkey door double dough down dozen dragon drama
drastic draw dream dress drift drill drink drive drizzle drop drum dry duck duet dune dusk dust
duty dwarf dynamic each eager eagle ear early earnest earth easily east easy eat echo eclipse
economy edge educate effect effort egg eight elastic elbow electric elegant element elephant
elevator else ember embrace emerald emerge emotion empire employ empty enable end endless
endorse enemy energy enforce engage engine enhance enjoy enormous enough ensure enter entire
entry envelope envoy epic episode equal equator equip era erase erode errand escape essay estate
eternal ethic even evening event ever every evidence evolve exact examine example exceed except
excess exchange excite exclude excuse exercise exhibit exile exist exit expand expect expense
experience expert explain explore export express extend extra eye fable fabric fabulous face
fact factory faculty faint fair faith falcon fall family famous fan fancy fantasy far farm
fashion fast fasten fat father fawn fear feast feather feature federal feeble feed feel fellow
female fence fern ferry festival few fiber fiction fiddle field fierce fig figure fill film
filter final finance finch find fine finger finish fire first fish fit fitness five fjord flag
flame flannel flash flask flat flavor fleet flexible flight flint float flock flood floor flour
flower flute flutter fly foam focus fog foggy fold follow food foot for force forecast foreign
forest forever forge forget fork form formal fort fortune forward fossil found fountain fox
fragile fragment frame free freedom freeze frequent fresh friend friendly frigate frighten
fringe frog from front frontier frost frozen fruit fudge fuel fulfill full fun funnel fur
furnish future gadget gain galaxy gallery gallon game gamma garage garden garlic garment garnet
gas gate gather gazelle gear gecko gem generous genius gentle genuine gesture geyser giant gift
ginger giraffe girl give glacier glad glade glance glass gleam glider glimmer glimpse global
globe glossy glove glow glue gnome goat goblet gold golden gondola good goose gorgeous gorilla
gospel gourd govern gown grab graceful gradual grain grand granite grape graph grass grateful
gravel gravity gray great greedy green grew grocery ground group grove grow guarantee guard
guess guest guide guitar gulf gull gust habit habitat hair half hall hamlet hammer hammock
hand handle handsome happen happy harbor hard harmony harp harsh harvest has hat hatch have
haven hawk hazard hazel head health healthy hear heart heat heavy hedge height hello helmet help
helpful her herb here hermit hero heron hidden high highway hill him hinge hippo his history
hive hold hole holiday hollow holly home honest honey hook hope horizon horn hornet horrible
horse hospital host hot hotel hound hour house how huge hull human humble humor hundred hunger
hungry hunt hurdle hurry husky hymn ice icicle idea identify igloo ignore illegal image imagine
immense impact impress improve in inch include income increase index indicate indoor infant
inform initial injury ink inlet innocent input inquire insect inside insist inspect inspire
install instance instant intend interest invent invest invite involve iris iron is island ivory
ivy jacket jade jaguar jar jasmine jaw jealous jelly jersey jewel jigsaw job jockey join joke
jolly journal journey joy joyful judge juice jump jungle juniper just justice kayak keep kernel
kettle key kid kind kindness king kingdom kiosk kitchen kite kiwi knee knife knight knot know
knowledge koala label lace ladder lady lagoon lake lamp land landscape language lantern lapel
laptop larch large lark laser last latch late lattice laugh launch lava lawn lawyer layer lazy
lead leader leaf learn leather leave left leg legend leisure lemon lemur length lengthy lens
lesson letter level lever liberty library lift light like lilac lily lime limit line linen lion
lip liquid list listen little live lively lizard load loaf lobster local lock locket locust
lodge loft log logical lonely long look loop lot lotus loud love low loyal luck luggage lumber
lunch luxury lynx machine magenta magic magical magnet magnify mail main maintain major make
mammal man manage mango manner mantle many map maple marble march marine mark market marsh mask
mass massive mast master match material matter maximum may meadow meal meaning measure meat
medal medical meet mellow melody melon melt member memory mention merchant mesa message metal
meteor method midday middle midnight mighty mile milk mill mind mineral minimum minor mint
minute miracle mirror miss mission mist mix moat mobile mocha model modern modest moisture molar
moment money monitor monkey monsoon monster month moon moose more morning mosaic moss most motel
moth mother motion motor mountain mouse mouth move much mud muffin mule mural muscle museum
music mustard my mystery myth nail name narrow nation native natural nature navigate near nearby
neat neck nectar need needle nerve nervous nest net network neutral never new news next nice
nickel night nimbus nine noble noise noodle noon normal north nose notable note nothing notice
nova novel now nuclear nugget number nurse nut oak oasis obey object observe obtain obvious
occasion occupy ocean ocelot octave odd of offend offer office official often oil old olive on
one onion only onyx opal open opera opinion oppose optimal orange orbit orchard orchid order
ordinary organ organic origin other otter out outcome outdoor output outside oven over overcome
owl own oxygen oyster pack paddle page pagoda painful paint pair palace palm pan panda panel
panther papaya paper parade parallel parcel parent park parrot part partner party pass passage
passion past pasta paste pastel path patient patio patrol pattern pause peace peaceful peach
peak pear pearl pebble pecan peculiar pelican pen pencil pendant penguin people pepper perfect
perform period permit person persuade pet petal pewter pheasant phrase physical piano piccolo
pick pickle pickup picture pie piece pig pigeon pigment pilgrim pillow pilot pin pine pink
pinnacle pioneer pipe pistol pitch pixel place plain plane planet plant plate play plaza
pleasant please plenty plum plume plural pocket poem point polar pole police polite polka pond
pony pool poor poplar poppy popular porch port portal portion portray position positive possible
post postpone pot potato pottery pound powder power powerful practice prairie praise precise
predict prefer prepare present preserve press pretend pretty prevent price pride primary prince
print prism private prize probable problem proceed process produce profile profit program
progress project promise promote prompt prong proof proper protect proud provide prune public
pudding puffin pull pulse puma pump pupil puppy purple push puzzle quail quality quantity
quarter quartz queen question quick quiet quilt quiver rabbit race radio radish raft rafter rail
rain rainbow raise raisin ramp ranch range rapid rapids rarely rate rather rattle raven razor
reach reaction read ready real realize reason receive recent recipe record recover red reduce
reef reflect reform refuse regard region regular reject relax release relic relief remain remark
remember remind remote remove rental repair repeat replace reply report request require rescue
resolve respect respond rest restore result retain return reveal reverse review reward rhino
rhythm ribbon rice rich riddle ride ridge right rigid ring ripe ritual rival river rivet road
robe robin robot robust rock rocket rodeo roll romantic roof rook room root rope rose rosemary
rotate rough round routine row royal rubber ruby rudder rule run rune rural rush rustic sable
sacred saddle safe saffron saga said sail salad salmon salt same sample sand sandal sapphire
satin satisfy sauce saucer savanna save saw say scale scarf scarlet scatter scenery scepter
schedule scheme school science scissors score scratch screen scroll sea seal search season seat
second secret secure see seed segment select sell send senior sense sensible sentence sequin
serious serve service session set settle seven severe shade shadow shake shallow shamrock shape
share shark sharp she sheep sheet shelf shell shelter shield shine shiny ship shirt shoe shop
shore short shortly shoulder shout show shower shrine shrub side sight sign signal silence
silent silk silver similar simple sincere sing single siren sister sit six size skate skeleton
sketch skill skin skirt sky slate sled sleep sleeve sleigh slender slide slippery slope slow
small smell smile smoke smooth snack snail snake snow so soap soccer social sock soft soil solar
soldier solid solution some son song sonnet sound soup south space spark sparkle speak special
species speed spell spend spice spider spin spiral spirit splendid spoken sponge spoon sport
spot spring sprout spruce square squash squid squirrel stable stage stair stallion stamp stand
stanza star start state station steady steam steel steeple stem stencil step stick sticky still
stomach stone stool stop store stork storm story stove straight strange strategy straw stream
street strength stretch strict string stripe strong strudel struggle stubborn student study
sturdy subject submit succeed sudden sugar suggest sultan summer summit sun sundial superb
supper supply support suppose supreme surface surprise surround survey survive suspect swallow
swamp swan sweet swift swim swing sycamore symbol sympathy syrup system table tablet taco tail
take tale talent talk tall talon tambourine tangerine tank tape tapestry target tassel taste
tavern tea teach teal team tear teeth tell temper temple ten tender tent term terrible test
texture than thank the their them then theory there these they thick thimble thin thing think
third this thistle thorn thorough thought thread three thrill throat throne thrush thumb thunder
ticket tide tidy tiger timber time tin tinsel tiny tire tissue title to toad toast today toe
toffee together tolerate tomato tomorrow tone tongue tonight tool tooth top topaz topic torch
tornado total toucan touch tourist towel tower town toy track trade tragic train transfer
transform transport travel tray treasure treaty tree trellis tremble tribe trick trident trip
trolley trophy tropical trouble trout truck true trumpet trunk trust truth try tube tulip tumble
tundra tune tunnel turban turkey turn turquoise turtle tusk twelve twig twilight twin twinkle
two type typical ugly ultimate umbrella unable uncle uncover under unique unit universe unknown
unusual update upgrade upper upset urban urgent use useful usual utility vacant vague valid
valley value valve van vanilla vanish vapor variety various vase vast vault vegetable velvet
venom venture verify verse version very vessel vest vibrant victory view village vine vintage
viola violet viper virtual visible visit visor vital vivid voice volcano volume vortex vote
voyage waffle wagon wait walk wall walnut walrus wand wander want warbler warm warrior was wash
wasp watch water wave wax way weak wealth wealthy wear weather weave wedge week weight welcome
well were west western wet whale wharf what wheat wheel when whenever which whip whisker whisper
whistle white who whole wide wife wild will willow win wind window wine wing winter wire wisdom
wise wish witch with wizard wolf woman wombat wonder wonderful wood wool word work world worm
worry worthy would wrap wreck wren wrist write yacht yak yard yarn year yearly yellow yield
yodel yogurt young your youth zealous zebra zenith zephyr zero zinc zipper zone
"""

# Words that appear unprefixed right after a turn marker in the chat templates; giving them
# whole tokens keeps the template's token count close to a real model's.
_TEMPLATE_WORDS = ("user", "model", "system", "assistant")

# gguf token types (llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6

SPM_SPACE = "\u2581"  # sentencepiece's visible space


@dataclass(frozen=True)
class Vocab:
    """A tokenizer as written to GGUF, plus which ids the weights treat specially."""

    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre ("" for none)
    tokens: list[str]
    types: list[int]
    scores: list[float]
    merges: list[str]
    special_ids: dict[str, int]  # "bos" / "eos" / "unk" / "padding" -> id
    add_bos: bool
    add_space_prefix: bool | None
    chat_template: str
    word_ids: list[int] = field(default_factory=list)  # whole words: the only likely outputs
    quiet_ids: list[int] = field(default_factory=list)  # newline: embedding near zero

    def id_of(self, token: str) -> int:
        return self.tokens.index(token)


def words() -> list[str]:
    return sorted(set(_WORDS.split()))


def _prefix_closure(pieces: Iterable[str], min_len: int) -> list[str]:
    """Every piece plus its prefixes of at least ``min_len`` characters, first-seen order.

    Both tokenizers build a word by merging left to right, so each intermediate prefix
    must itself be a token.
    """
    seen: dict[str, None] = {}
    for piece in pieces:
        for end in range(min_len, len(piece) + 1):
            seen.setdefault(piece[:end], None)
    return list(seen)


def _chain_merges(pieces: Iterable[str]) -> list[str]:
    """BPE merges ``"prefix next_char"`` that build each piece left to right."""
    seen: dict[str, None] = {}
    for piece in pieces:
        for end in range(2, len(piece) + 1):
            seen.setdefault(f"{piece[:end - 1]} {piece[end - 1]}", None)
    return list(seen)

# Gemma 3's chat template (google/gemma-3-*-it), images as <start_of_image>.
GEMMA3_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Qwen2-VL's chat template (Qwen/Qwen2-VL-7B-Instruct).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_GEMMA3_SPECIALS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
)
_QWEN2VL_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)


def gemma3_vocab() -> Vocab:
    """A sentencepiece ("llama") vocabulary shaped like Gemma 3's.

    Byte-fallback tokens cover any input; whole ``▁word`` tokens (with every prefix, since
    sentencepiece merges pairs that are themselves tokens) make prompts tokenize into words.
    ``▁`` pieces get higher scores than unprefixed ones so their merges always win.
    """
    specials = list(_GEMMA3_SPECIALS)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    chars = ["\n", "\n\n", SPM_SPACE] + [chr(c) for c in range(0x21, 0x7F)]
    spaced = _prefix_closure((SPM_SPACE + w for w in words()), 2)
    plain = [p for p in _prefix_closure(_TEMPLATE_WORDS, 2) if p not in chars]
    tokens = specials + byte_tokens + chars + spaced + plain
    types = ([_CONTROL] * len(specials) + [_BYTE] * len(byte_tokens)
             + [_NORMAL] * (len(chars) + len(spaced) + len(plain)))
    types[specials.index("<unk>")] = _UNKNOWN
    first_piece = len(specials) + len(byte_tokens)
    scores = [0.0] * first_piece + [-float(i) for i in range(len(tokens) - first_piece)]
    word_set = {SPM_SPACE + w for w in words()}
    return Vocab(
        model="llama", pre="", tokens=tokens, types=types, scores=scores, merges=[],
        special_ids={"bos": 2, "eos": 1, "unk": 3, "padding": 0},
        add_bos=True, add_space_prefix=False, chat_template=GEMMA3_CHAT_TEMPLATE,
        word_ids=[i for i, t in enumerate(tokens) if t in word_set],
        quiet_ids=[tokens.index("\n"), tokens.index("<0x0A>")],
    )


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def qwen2vl_vocab() -> Vocab:
    """A byte-level BPE ("gpt2", pre-tokenizer "qwen2") vocabulary shaped like Qwen2's.

    All 256 byte characters are tokens, so any text tokenizes. Merges build ``Ġword``
    tokens left to right; they rank before the unprefixed template-word merges so that a
    word's merge chain is never interrupted.
    """
    b2u = _byte_to_unicode()
    space, newline = b2u[0x20], b2u[0x0A]
    byte_chars = [b2u[b] for b in range(256)]
    spaced_words = [space + w for w in words()]
    spaced = _prefix_closure(spaced_words, 2)
    plain = _prefix_closure(_TEMPLATE_WORDS, 2)
    newlines = [newline * 2]
    pieces = spaced + newlines + plain
    tokens = byte_chars + pieces + list(_QWEN2VL_SPECIALS)
    types = [_NORMAL] * (len(byte_chars) + len(pieces)) + [_CONTROL] * len(_QWEN2VL_SPECIALS)
    merges = _chain_merges(spaced_words) + _chain_merges(newlines) + _chain_merges(
        _TEMPLATE_WORDS)
    word_set = set(spaced_words)
    return Vocab(
        model="gpt2", pre="qwen2", tokens=tokens, types=types, scores=[], merges=merges,
        special_ids={"bos": tokens.index("<|endoftext|>"), "eos": tokens.index("<|im_end|>"),
                     "padding": tokens.index("<|endoftext|>")},
        add_bos=False, add_space_prefix=None, chat_template=QWEN2VL_CHAT_TEMPLATE,
        word_ids=[i for i, t in enumerate(tokens) if t in word_set],
        quiet_ids=[tokens.index(newline)],
    )


def vocab_for(arch: Arch) -> Vocab:
    return gemma3_vocab() if arch == "gemma3" else qwen2vl_vocab()


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------

Maker = Callable[[], F32Array]


@dataclass(frozen=True)
class TensorPlan:
    """One tensor: its GGUF name, numpy shape (out, in), storage type and a value maker.

    Values are made only when the tensor is written, so a multi-GB model never sits in
    memory at once.
    """

    name: str
    shape: tuple[int, ...]
    dtype: type[np.float32] | type[np.float16]
    make: Maker

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def _rng(seed: int, name: str) -> np.random.Generator:
    # One stream per (seed, tensor name): values do not depend on generation order, and
    # a tensor can be re-drawn (the merger bias needs the weight it cancels).
    # SFC64 draws uniforms ~5x faster than PCG64 draws normals.
    entropy = [seed, zlib.crc32(name.encode())]
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence(entropy)))


def uniform(seed: int, name: str, shape: tuple[int, ...], std: float) -> F32Array:
    """Zero-mean uniform noise with standard deviation ``std``.

    Uniform rather than normal because it is several times cheaper to draw; every weight
    feeds sums over hundreds of inputs, which are Gaussian either way.
    """
    values = _rng(seed, name).random(shape, dtype=np.float32)
    values -= np.float32(0.5)
    values *= np.float32(std * math.sqrt(12.0))
    return values


def _full(shape: tuple[int, ...], value: float) -> Maker:
    return lambda: np.full(shape, value, dtype=np.float32)


class _Planner:
    """Collects tensor plans; matrices take the model's storage type, vectors stay f32."""

    def __init__(self, seed: int, matrix_type: Literal["f32", "f16"]) -> None:
        self.seed = seed
        self.matrix_dtype: type[np.float32] | type[np.float16] = (
            np.float16 if matrix_type == "f16" else np.float32)
        self.plans: list[TensorPlan] = []

    def add(self, name: str, shape: tuple[int, ...], make: Maker, *, matrix: bool) -> None:
        dtype = self.matrix_dtype if matrix else np.float32
        self.plans.append(TensorPlan(name, shape, dtype, make))

    def weight(self, name: str, shape: tuple[int, ...], std: float) -> None:
        """A matrix (or conv kernel) of uniform noise."""
        seed = self.seed
        self.add(name, shape, lambda: uniform(seed, name, shape, std), matrix=True)

    def noise(self, name: str, size: int, std: float) -> None:
        """A vector of uniform noise (biases)."""
        seed = self.seed
        self.add(name, (size,), lambda: uniform(seed, name, (size,), std), matrix=False)

    def const(self, name: str, size: int, value: float) -> None:
        """A constant vector (norm weights and biases)."""
        self.add(name, (size,), _full((size,), value), matrix=False)

    def layer_norm(self, prefix: str, size: int) -> None:
        self.const(f"{prefix}.weight", size, 1.0)
        self.const(f"{prefix}.bias", size, 0.0)


def _token_embd(seed: int, shape: tuple[int, int], std: float, vocab: Vocab,
                shaping: Shaping) -> Maker:
    def make() -> F32Array:
        values = uniform(seed, "token_embd.weight", shape, std)
        values[vocab.quiet_ids] *= np.float32(shaping.quiet_token_scale)
        return values
    return make


def _output(seed: int, shape: tuple[int, int], vocab: Vocab, shaping: Shaping) -> Maker:
    # The final RMS norm makes the hidden state's entries ~1, so a row with entries of std
    # s / sqrt(n_embd) yields logits of std s.
    def make() -> F32Array:
        values = uniform(seed, "output.weight", shape, 1.0 / math.sqrt(shape[1]))
        row_scale = np.full((shape[0], 1), shaping.minor_logit_std, dtype=np.float32)
        row_scale[vocab.word_ids] = shaping.word_logit_std
        values *= row_scale
        return values
    return make


def text_plan(spec: ModelSpec, vocab: Vocab, shaping: Shaping, seed: int) -> list[TensorPlan]:
    """Tensors of the text model, in the layout llama.cpp's gemma3 / qwen2vl loaders expect."""
    t = spec.text
    d, n_vocab = t.n_embd, len(vocab.tokens)
    p = _Planner(seed, spec.matrix_type)
    # Gemma scales token embeddings by sqrt(n_embd) (but not image embeddings); both archs
    # end up with entries of std ~1 in the residual stream, like the image embeddings.
    embd_std = 1.0 / math.sqrt(d) if spec.arch == "gemma3" else 1.0
    p.add("token_embd.weight", (n_vocab, d),
          _token_embd(seed, (n_vocab, d), embd_std, vocab, shaping), matrix=True)
    p.const("output_norm.weight", d, 1.0)
    # Untied output: rows are independent of the input embeddings, so a word does not
    # predict itself and the text does not collapse into one repeated word.
    p.add("output.weight", (n_vocab, d), _output(seed, (n_vocab, d), vocab, shaping),
          matrix=True)
    for i in range(t.n_layer):
        if spec.arch == "gemma3":
            _gemma3_text_block(p, spec, shaping, f"blk.{i}")
        else:
            _qwen2vl_text_block(p, spec, shaping, f"blk.{i}")
    return p.plans


def _gemma3_text_block(p: _Planner, spec: ModelSpec, shaping: Shaping, blk: str) -> None:
    t = spec.text
    d, q_dim, kv_dim = t.n_embd, t.n_head * t.head_dim, t.n_head_kv * t.head_dim
    p.const(f"{blk}.attn_norm.weight", d, 1.0)
    p.weight(f"{blk}.attn_q.weight", (q_dim, d), 1.0 / math.sqrt(d))
    p.weight(f"{blk}.attn_k.weight", (kv_dim, d), 1.0 / math.sqrt(d))
    p.weight(f"{blk}.attn_v.weight", (kv_dim, d), 1.0 / math.sqrt(d))
    p.weight(f"{blk}.attn_output.weight", (d, q_dim), 1.0 / math.sqrt(q_dim))
    # Q and K are RMS-normed per head, so their norm weights alone set attention sharpness.
    p.const(f"{blk}.attn_q_norm.weight", t.head_dim, shaping.qk_gain)
    p.const(f"{blk}.attn_k_norm.weight", t.head_dim, shaping.qk_gain)
    p.const(f"{blk}.post_attention_norm.weight", d, shaping.gemma_post_attn_gain)
    p.const(f"{blk}.ffn_norm.weight", d, 1.0)
    p.weight(f"{blk}.ffn_gate.weight", (t.n_ff, d), 1.0 / math.sqrt(d))
    p.weight(f"{blk}.ffn_up.weight", (t.n_ff, d), 1.0 / math.sqrt(d))
    p.weight(f"{blk}.ffn_down.weight", (d, t.n_ff), 1.0 / math.sqrt(t.n_ff))
    p.const(f"{blk}.post_ffw_norm.weight", d, shaping.ffn_gain)


def _qwen2vl_text_block(p: _Planner, spec: ModelSpec, shaping: Shaping, blk: str) -> None:
    t = spec.text
    d, q_dim, kv_dim = t.n_embd, t.n_head * t.head_dim, t.n_head_kv * t.head_dim
    p.const(f"{blk}.attn_norm.weight", d, 1.0)
    p.weight(f"{blk}.attn_q.weight", (q_dim, d), shaping.qk_gain / math.sqrt(d))
    p.weight(f"{blk}.attn_k.weight", (kv_dim, d), shaping.qk_gain / math.sqrt(d))
    p.weight(f"{blk}.attn_v.weight", (kv_dim, d), shaping.vo_gain / math.sqrt(d))
    # Qwen2 has Q/K/V biases; small ones keep attention query-driven.
    p.noise(f"{blk}.attn_q.bias", q_dim, 0.02)
    p.noise(f"{blk}.attn_k.bias", kv_dim, 0.02)
    p.noise(f"{blk}.attn_v.bias", kv_dim, 0.02)
    p.weight(f"{blk}.attn_output.weight", (d, q_dim), shaping.vo_gain / math.sqrt(q_dim))
    p.const(f"{blk}.ffn_norm.weight", d, 1.0)
    p.weight(f"{blk}.ffn_gate.weight", (t.n_ff, d), 1.0 / math.sqrt(d))
    p.weight(f"{blk}.ffn_up.weight", (t.n_ff, d), 1.0 / math.sqrt(d))
    p.weight(f"{blk}.ffn_down.weight", (d, t.n_ff), shaping.ffn_gain / math.sqrt(t.n_ff))


def _vit_block(p: _Planner, v: VisionSpec, shaping: Shaping, blk: str) -> None:
    """One pre-norm ViT block (SigLIP and Qwen2-VL share the tensor set)."""
    d, ff = v.n_embd, v.n_ff
    # Residual branches scaled by ~0.7/sqrt(layers): the stream stays dominated by the
    # patch embedding even after 27-32 layers, so patches (and images) stay distinct.
    branch = shaping.vision_residual / math.sqrt(v.n_layer)
    p.layer_norm(f"{blk}.ln1", d)
    for proj in ("attn_q", "attn_k", "attn_v"):
        p.weight(f"{blk}.{proj}.weight", (d, d), 1.0 / math.sqrt(d))
        p.noise(f"{blk}.{proj}.bias", d, 0.02)
    p.weight(f"{blk}.attn_out.weight", (d, d), branch / math.sqrt(d))
    p.const(f"{blk}.attn_out.bias", d, 0.0)
    p.layer_norm(f"{blk}.ln2", d)
    # ffn_up is (n_ff, n_embd) and ffn_down (n_embd, n_ff); n_ff != n_embd keeps clip.cpp's
    # legacy up/down swap heuristic from firing.
    p.weight(f"{blk}.ffn_up.weight", (ff, d), 1.0 / math.sqrt(d))
    p.noise(f"{blk}.ffn_up.bias", ff, 0.02)
    p.weight(f"{blk}.ffn_down.weight", (d, ff), branch / math.sqrt(ff))
    p.const(f"{blk}.ffn_down.bias", d, 0.0)


def _patch_kernel_shape(v: VisionSpec) -> tuple[int, int, int, int]:
    return (v.n_embd, 3, v.patch_size, v.patch_size)


def vision_plan(spec: ModelSpec, shaping: Shaping, seed: int) -> list[TensorPlan]:
    """Tensors of the mmproj file: vision tower plus projector."""
    v = spec.vision
    p = _Planner(seed, spec.matrix_type)
    # Normalised pixels are ~[-1, 1]; this gain gives patch embeddings of std ~1.
    patch_std = shaping.patch_gain / math.sqrt(3 * v.patch_size**2)
    if spec.arch == "gemma3":
        p.weight("v.patch_embd.weight", _patch_kernel_shape(v), patch_std)
        p.noise("v.patch_embd.bias", v.n_embd, 0.02)
        n_pos = (v.image_size // v.patch_size) ** 2
        p.add("v.position_embd.weight", (n_pos, v.n_embd),
              lambda: uniform(seed, "v.position_embd.weight", (n_pos, v.n_embd),
                              shaping.position_std), matrix=False)
    else:
        # Two temporal kernels, both applied to a still image: split the gain between them.
        for name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):
            p.weight(name, _patch_kernel_shape(v), patch_std / math.sqrt(2))
    for i in range(v.n_layer):
        _vit_block(p, v, shaping, f"v.blk.{i}")
    p.layer_norm("v.post_ln", v.n_embd)
    if spec.arch == "gemma3":
        _gemma3_projector(p, spec)
    else:
        _qwen2vl_merger(p, spec, shaping)
    return p.plans


def _gemma3_projector(p: _Planner, spec: ModelSpec) -> None:
    # After pooling: RMS norm * soft_emb_norm, then a linear map to the text width.
    # Stored (vision, text): clip.cpp transposes it before the matmul.
    v, d = spec.vision.n_embd, spec.text.n_embd
    p.const("mm.soft_emb_norm.weight", v, 1.0)
    p.weight("mm.input_projection.weight", (v, d), 1.0 / math.sqrt(v))


def gelu_mean(shift: float) -> float:
    """E[gelu(z + shift)] for z ~ N(0, 1), with ggml's tanh-approximated GELU."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    x = nodes + shift
    gelu = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return float(np.dot(weights, gelu) / math.sqrt(2.0 * math.pi))


def _qwen2vl_merger(p: _Planner, spec: ModelSpec, shaping: Shaping) -> None:
    # 2x2 neighbouring patches concatenated -> mm.0 -> GELU -> mm.2 -> text width.
    width, d = 4 * spec.vision.n_embd, spec.text.n_embd
    seed, dtype, shift = p.seed, p.matrix_dtype, shaping.merger_gelu_shift
    p.weight("mm.0.weight", (width, width), 1.0 / math.sqrt(width))
    # Shifting GELU's input keeps it in its near-linear range (image detail survives)...
    p.const("mm.0.bias", width, shift)
    p.weight("mm.2.weight", (d, width), 1.0 / math.sqrt(width))

    # ...and this bias removes the shift's large constant output, which would otherwise
    # make every image token nearly the same vector.
    def cancel_shift() -> F32Array:
        w2 = uniform(seed, "mm.2.weight", (d, width), 1.0 / math.sqrt(width))
        row_sums: F32Array = w2.astype(dtype).astype(np.float32).sum(axis=1)
        row_sums *= np.float32(-gelu_mean(shift))
        return row_sums

    p.add("mm.2.bias", (d,), cancel_shift, matrix=False)


# --------------------------------------------------------------------------------------
# GGUF metadata
# --------------------------------------------------------------------------------------

KvWriter = Callable[[gguf.GGUFWriter], None]

# Mean / std that mtmd normalises pixels with (SigLIP's and OpenAI CLIP's).
_SIGLIP_MEAN_STD = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
_CLIP_MEAN_STD = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


def _file_type(spec: ModelSpec) -> int:
    return int(gguf.LlamaFileType.MOSTLY_F16 if spec.matrix_type == "f16"
               else gguf.LlamaFileType.ALL_F32)


def _text_kv(spec: ModelSpec, vocab: Vocab) -> KvWriter:
    def write(w: gguf.GGUFWriter) -> None:
        t, a = spec.text, spec.arch
        w.add_name(f"vcache test {a} {spec.size}")
        w.add_file_type(_file_type(spec))
        w.add_uint32(f"{a}.context_length", t.n_ctx)
        w.add_uint32(f"{a}.embedding_length", t.n_embd)
        w.add_uint32(f"{a}.block_count", t.n_layer)
        w.add_uint32(f"{a}.feed_forward_length", t.n_ff)
        w.add_uint32(f"{a}.attention.head_count", t.n_head)
        w.add_uint32(f"{a}.attention.head_count_kv", t.n_head_kv)
        w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
        w.add_float32(f"{a}.rope.freq_base", t.rope_base)
        if a == "gemma3":
            w.add_uint32(f"{a}.attention.key_length", t.head_dim)
            w.add_uint32(f"{a}.attention.value_length", t.head_dim)
            # Like the real model: local layers (window + their own RoPE base), default
            # pattern of five local layers per global one.
            w.add_uint32(f"{a}.attention.sliding_window", t.sliding_window)
            w.add_float32(f"{a}.rope.freq_base_swa", 10_000.0)
        else:
            w.add_array(f"{a}.rope.dimension_sections", list(t.rope_sections))
        _tokenizer_kv(w, vocab)
    return write


def _tokenizer_kv(w: gguf.GGUFWriter, vocab: Vocab) -> None:
    w.add_tokenizer_model(vocab.model)
    if vocab.pre:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores:
        w.add_token_scores(vocab.scores)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    ids = vocab.special_ids
    w.add_bos_token_id(ids["bos"])
    w.add_eos_token_id(ids["eos"])
    if "unk" in ids:
        w.add_unk_token_id(ids["unk"])
    w.add_pad_token_id(ids["padding"])
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    w.add_chat_template(vocab.chat_template)


def _mmproj_kv(spec: ModelSpec) -> KvWriter:
    def write(w: gguf.GGUFWriter) -> None:
        v = spec.vision
        w.add_name(f"vcache test {spec.arch} {spec.size} mmproj")
        w.add_file_type(_file_type(spec))
        w.add_bool("clip.has_vision_encoder", True)
        w.add_uint32("clip.vision.image_size", v.image_size)
        w.add_uint32("clip.vision.patch_size", v.patch_size)
        w.add_uint32("clip.vision.embedding_length", v.n_embd)
        w.add_uint32("clip.vision.feed_forward_length", v.n_ff)
        w.add_uint32("clip.vision.block_count", v.n_layer)
        w.add_uint32("clip.vision.projection_dim", spec.text.n_embd)
        w.add_uint32("clip.vision.attention.head_count", v.n_head)
        w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
        if spec.arch == "gemma3":
            mean, std = _SIGLIP_MEAN_STD
            w.add_string("clip.projector_type", "gemma3")
            w.add_bool("clip.use_gelu", True)  # SigLIP MLP; qwen2vl keeps quick-GELU
            w.add_uint32("clip.vision.projector.scale_factor", v.n_merge)
        else:
            mean, std = _CLIP_MEAN_STD
            w.add_string("clip.projector_type", "qwen2vl_merger")
            w.add_uint32("clip.vision.spatial_merge_size", v.n_merge)
        w.add_array("clip.vision.image_mean", mean)
        w.add_array("clip.vision.image_std", std)
    return write


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

_PROGRESS_EVERY = 512 * 1024 * 1024  # bytes between progress lines on big files


def write_gguf(path: Path, arch: str, kv: KvWriter, plans: Sequence[TensorPlan],
               label: str) -> None:
    """Stream tensors into ``path`` one at a time, via a temporary file and a rename.

    The rename makes the file appear complete or not at all, so a concurrent reader (or
    a killed run) never sees half a model.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        kv(writer)
        for plan in plans:
            writer.add_tensor_info(plan.name, plan.shape, np.dtype(plan.dtype), plan.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, plans, label)
    finally:
        writer.close()
    os.replace(tmp, path)


def _write_tensors(writer: gguf.GGUFWriter, plans: Sequence[TensorPlan], label: str) -> None:
    total = sum(plan.nbytes for plan in plans)
    done, next_report = 0, _PROGRESS_EVERY
    for plan in plans:
        values = plan.make()
        if values.shape != plan.shape:
            raise AssertionError(f"{plan.name}: made {values.shape}, planned {plan.shape}")
        writer.write_tensor_data(values.astype(plan.dtype, copy=False))
        done += plan.nbytes
        if total > _PROGRESS_EVERY and done >= next_report:
            print(f"  {label}: {done / 2**20:,.0f} / {total / 2**20:,.0f} MiB", flush=True)
            next_report = done + _PROGRESS_EVERY


# --------------------------------------------------------------------------------------
# Generation with a manifest
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    """Where a generated model lives, and what a cached visual package costs for it."""

    directory: Path
    model: Path
    mmproj: Path
    manifest: Path
    n_embd: int  # text width: each image token's embedding has this many floats

    def package_bytes(self, n_image_tokens: int) -> int:
        """Size of one image's post-encoder embeddings (f32) for ``n_image_tokens``."""
        return n_image_tokens * self.n_embd * 4


def model_files(out: Path, arch: Arch, size: Size) -> ModelFiles:
    directory = out / f"{arch}-{size}"
    return ModelFiles(directory=directory, model=directory / "model.gguf",
                      mmproj=directory / "mmproj.gguf", manifest=directory / "manifest.json",
                      n_embd=model_spec(arch, size).text.n_embd)


def _vocab_digest(vocab: Vocab) -> str:
    blob = json.dumps([vocab.tokens, vocab.types, vocab.scores, vocab.merges,
                       vocab.chat_template], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def _params(spec: ModelSpec, shaping: Shaping, vocab: Vocab, seed: int) -> dict[str, Any]:
    """Everything the output depends on; a manifest with other params means regenerate."""
    return {"generator_version": GENERATOR_VERSION, "seed": seed,
            "spec": dataclasses.asdict(spec), "shaping": dataclasses.asdict(shaping),
            "vocab_sha256": _vocab_digest(vocab)}


def _up_to_date(files: ModelFiles, params: dict[str, Any]) -> bool:
    try:
        manifest = json.loads(files.manifest.read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("params") != json.loads(json.dumps(params)):
        return False
    sizes: dict[str, int] = manifest.get("file_sizes", {})
    for path in (files.model, files.mmproj):
        # A size mismatch means a truncated or foreign file: regenerate it.
        if not path.is_file() or path.stat().st_size != sizes.get(path.name):
            return False
    return True


def _write_manifest(files: ModelFiles, params: dict[str, Any], vocab: Vocab,
                    seconds: float) -> None:
    manifest = {
        "params": params,
        "file_sizes": {p.name: p.stat().st_size for p in (files.model, files.mmproj)},
        "n_vocab": len(vocab.tokens),
        "n_word_tokens": len(vocab.word_ids),
        "package_bytes_per_image_token": files.package_bytes(1),
        "generation_seconds": round(seconds, 2),
    }
    tmp = files.manifest.with_name(f".{files.manifest.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, files.manifest)


def generate(arch: Arch, size: Size, seed: int, out: Path, *, force: bool = False) -> ModelFiles:
    """Write ``out/<arch>-<size>/`` unless a manifest shows it is already there."""
    spec, shaping = model_spec(arch, size), Shaping()
    files = model_files(out, arch, size)
    vocab = vocab_for(arch)
    params = _params(spec, shaping, vocab, seed)
    label = f"{arch}-{size}"
    if not force and _up_to_date(files, params):
        print(f"{label}: up to date in {files.directory}", flush=True)
        return files
    start = time.monotonic()
    files.directory.mkdir(parents=True, exist_ok=True)
    print(f"{label}: writing {files.model}", flush=True)
    write_gguf(files.model, arch, _text_kv(spec, vocab), text_plan(spec, vocab, shaping, seed),
               f"{label} model")
    print(f"{label}: writing {files.mmproj}", flush=True)
    write_gguf(files.mmproj, "clip", _mmproj_kv(spec), vision_plan(spec, shaping, seed),
               f"{label} mmproj")
    elapsed = time.monotonic() - start
    _write_manifest(files, params, vocab, elapsed)
    total = (files.model.stat().st_size + files.mmproj.stat().st_size) / 2**20
    print(f"{label}: done in {elapsed:.1f} s ({total:,.1f} MiB)", flush=True)
    return files


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--arch", choices=ARCHS, help="architecture to generate")
    parser.add_argument("--all", action="store_true", help="every architecture of --size")
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    if bool(args.arch) == args.all:
        parser.error("give exactly one of --arch or --all")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    archs: Sequence[Arch] = ARCHS if args.all else (args.arch,)
    for arch in archs:
        generate(arch, args.size, args.seed, args.out, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
