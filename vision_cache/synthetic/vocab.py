"""Vocabularies for generated models: a family's special tokens, byte fallback and ~2,500 whole
English words, as a sentencepiece or a byte-level BPE tokenizer.

Only whole words get large output weights, so a random-weight model says words rather than
fragments; `Vocab.word_ids` and `Vocab.quiet_ids` tell the weights which tokens those are.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

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
TEMPLATE_WORDS = ("user", "model", "system", "assistant")

# gguf token types (llama_token_type)
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6

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


def prefix_closure(pieces: Iterable[str], min_len: int) -> list[str]:
    """Every piece plus its prefixes of at least ``min_len`` characters, first-seen order.

    Both tokenizers build a word by merging left to right, so each intermediate prefix
    must itself be a token.
    """
    seen: dict[str, None] = {}
    for piece in pieces:
        for end in range(min_len, len(piece) + 1):
            seen.setdefault(piece[:end], None)
    return list(seen)


def chain_merges(pieces: Iterable[str]) -> list[str]:
    """BPE merges ``"prefix next_char"`` that build each piece left to right."""
    seen: dict[str, None] = {}
    for piece in pieces:
        for end in range(2, len(piece) + 1):
            seen.setdefault(f"{piece[: end - 1]} {piece[end - 1]}", None)
    return list(seen)


def sentencepiece_vocab(
    specials: Sequence[str], chat_template: str, *, bos: str, eos: str, unk: str, pad: str
) -> Vocab:
    """A sentencepiece ("llama") vocabulary: ``specials`` first, then bytes, then pieces.

    Byte-fallback tokens cover any input; whole ``▁word`` tokens (with every prefix, since
    sentencepiece merges pairs that are themselves tokens) make prompts tokenize into words.
    ``▁`` pieces get higher scores than unprefixed ones so their merges always win.
    """
    specials = list(specials)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    chars = ["\n", "\n\n", SPM_SPACE] + [chr(c) for c in range(0x21, 0x7F)]
    spaced = prefix_closure((SPM_SPACE + w for w in words()), 2)
    plain = [p for p in prefix_closure(TEMPLATE_WORDS, 2) if p not in chars]
    tokens = specials + byte_tokens + chars + spaced + plain
    types = (
        [CONTROL] * len(specials)
        + [BYTE] * len(byte_tokens)
        + [NORMAL] * (len(chars) + len(spaced) + len(plain))
    )
    types[specials.index(unk)] = UNKNOWN
    first_piece = len(specials) + len(byte_tokens)
    scores = [0.0] * first_piece + [-float(i) for i in range(len(tokens) - first_piece)]
    word_set = {SPM_SPACE + w for w in words()}
    return Vocab(
        model="llama",
        pre="",
        tokens=tokens,
        types=types,
        scores=scores,
        merges=[],
        special_ids={
            "bos": specials.index(bos),
            "eos": specials.index(eos),
            "unk": specials.index(unk),
            "padding": specials.index(pad),
        },
        add_bos=True,
        add_space_prefix=False,
        chat_template=chat_template,
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


def byte_level_bpe_vocab(
    specials: Sequence[str], chat_template: str, *, pre: str, bos: str, eos: str, pad: str
) -> Vocab:
    """A byte-level BPE ("gpt2") vocabulary: bytes, then pieces, then ``specials``.

    All 256 byte characters are tokens, so any text tokenizes. Merges build ``Ġword``
    tokens left to right; they rank before the unprefixed template-word merges so that a
    word's merge chain is never interrupted.
    """
    b2u = _byte_to_unicode()
    space, newline = b2u[0x20], b2u[0x0A]
    byte_chars = [b2u[b] for b in range(256)]
    spaced_words = [space + w for w in words()]
    spaced = prefix_closure(spaced_words, 2)
    plain = prefix_closure(TEMPLATE_WORDS, 2)
    newlines = [newline * 2]
    pieces = spaced + newlines + plain
    tokens = byte_chars + pieces + list(specials)
    types = [NORMAL] * (len(byte_chars) + len(pieces)) + [CONTROL] * len(specials)
    merges = chain_merges(spaced_words) + chain_merges(newlines) + chain_merges(TEMPLATE_WORDS)
    word_set = set(spaced_words)
    return Vocab(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        types=types,
        scores=[],
        merges=merges,
        special_ids={
            "bos": tokens.index(bos),
            "eos": tokens.index(eos),
            "padding": tokens.index(pad),
        },
        add_bos=False,
        add_space_prefix=None,
        chat_template=chat_template,
        word_ids=[i for i, t in enumerate(tokens) if t in word_set],
        quiet_ids=[tokens.index(newline)],
    )


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml_vocab(specials: Sequence[str] = ()) -> Vocab:
    """A byte-level BPE vocabulary with ChatML turns and a family's own special tokens.

    The text around an image is the family's business only through the special tokens mtmd
    looks up or emits (``<img>``, ``<fake_token_around_image>``, ``[IMG_END]``...): those
    must be single tokens. Everything else (the template, the pre-tokenizer) does not change
    how a package decodes, so the families that do not need their own share this one.
    """
    base = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    return byte_level_bpe_vocab(
        (*base, *(s for s in specials if s not in base)),
        CHATML_TEMPLATE,
        pre="qwen2",
        bos="<|endoftext|>",
        eos="<|im_end|>",
        pad="<|endoftext|>",
    )
