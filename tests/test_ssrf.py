"""The address and URL policy of proxy.images.ssrf: pure functions, no sockets."""

from __future__ import annotations

import dataclasses
import doctest
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import MediaNotAllowed
from proxy.images import ssrf
from proxy.images.ssrf import FetchPolicy, check_url, is_public_address, parse_host_address

NOT_PUBLIC = [
    # loopback
    "127.0.0.1",
    "127.255.255.254",
    "::1",
    # private
    "10.0.0.1",
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.0.1",
    "fc00::1",
    "fd12:3456::1",
    # link-local, incl. the cloud metadata service
    "169.254.169.254",
    "169.254.0.1",
    "fe80::1",
    "fe80::1%eth0",
    # CGNAT, multicast, reserved, broadcast, unspecified
    "100.64.0.1",
    "100.127.255.255",
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "240.0.0.1",
    "255.255.255.255",
    "0.0.0.0",
    "0.1.2.3",
    "::",
    # documentation and benchmarking
    "192.0.2.1",
    "198.51.100.7",
    "203.0.113.9",
    "198.18.0.1",
    "2001:db8::1",
    "3fff::1",
    # IPv4 inside IPv6
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",  # IPv4-compatible (deprecated)
    "::ffff:0:127.0.0.1",  # IPv4-translated
    "64:ff9b::7f00:1",  # NAT64 well-known prefix embedding 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # ... embedding 169.254.169.254
    "64:ff9b:1::808:808",  # local-use NAT64 prefix
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    "2001:0:a00:1:8000:63bf:f7f7:f7f7",  # Teredo, server 10.0.0.1
    # other non-global IPv6
    "fec0::1",
    "100::1",
    "2001:10::1",
]

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "172.32.0.1",  # just past 172.16/12
    "100.128.0.1",  # just past 100.64/10
    "192.169.0.1",
    "11.0.0.1",
    "2606:4700:4700::1111",
    "2a00:1450:4001::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8: how IPv6-only networks reach it
    "2002:808:808::1",  # 6to4 of 8.8.8.8
    "2001:0:4136:e378:8000:63bf:f7f7:f7f7",  # Teredo, server and client public
]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_not_public(address: str) -> None:
    ip = ip_address(address)
    assert not is_public_address(ip)
    assert ssrf.why_not_public(ip)


@pytest.mark.parametrize("address", PUBLIC)
def test_public(address: str) -> None:
    ip = ip_address(address)
    assert is_public_address(ip)
    assert ssrf.why_not_public(ip) is None


def test_reason_names_the_kind_of_address() -> None:
    assert ssrf.why_not_public(IPv4Address("127.0.0.1")) == "a loopback address"
    embedded = ssrf.why_not_public(IPv6Address("::ffff:169.254.169.254"))
    assert embedded == "an IPv6 address embedding 169.254.169.254, a link-local address"


# --- spellings of IPv4 addresses -----------------------------------------------------------

ODD_SPELLINGS = [
    ("2130706433", "127.0.0.1"),  # one decimal number
    ("0x7f000001", "127.0.0.1"),  # one hex number
    ("017700000001", "127.0.0.1"),  # one octal number
    ("0177.0.0.1", "127.0.0.1"),  # octal part
    ("0x7f.1", "127.0.0.1"),  # hex part, short form
    ("0X7F.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),  # short form: the last part fills the remaining bytes
    ("127.0.1", "127.0.0.1"),
    ("127.0.0.1.", "127.0.0.1"),  # trailing dot
    ("0", "0.0.0.0"),
    ("0x", "0.0.0.0"),  # a bare 0x is 0 to inet_aton
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
    ("2852039166", "169.254.169.254"),
    ("10.1", "10.0.0.1"),
    ("0300.0250.1.1", "192.168.1.1"),
    ("3232235777", "192.168.1.1"),
    ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
    ("fe80::1%25eth0", "fe80::1%eth0"),  # zone as URLs write it
]


@pytest.mark.parametrize(("host", "address"), ODD_SPELLINGS)
def test_odd_spellings_denote_their_address(host: str, address: str) -> None:
    assert parse_host_address(host) == ip_address(address)


@pytest.mark.parametrize(("host", "_"), ODD_SPELLINGS)
def test_odd_spellings_are_refused(host: str, _: str) -> None:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    with pytest.raises(MediaNotAllowed):
        check_url(f"http://{host}/img.png", FetchPolicy())


@pytest.mark.parametrize("host", ["example.com", "localhost", "images.test", "1a", "a1.b2"])
def test_names_are_not_addresses(host: str) -> None:
    assert parse_host_address(host) is None


@pytest.mark.parametrize(
    "host", ["1.2.3.256", "256.1", "1.2.3.4.5", "08.1", "0x1.09", "example.1", "1..2", "::g"]
)
def test_malformed_addresses_raise(host: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_host_address(host)


def _decimal(n: int) -> str:
    return str(n)


def _octal(n: int) -> str:
    return f"0{n:o}"


def _hex(n: int) -> str:
    return f"0x{n:x}"


def _hex_upper(n: int) -> str:
    return f"0X{n:X}"


@st.composite
def spellings(
    draw: st.DrawFn, addresses: st.SearchStrategy[IPv4Address]
) -> tuple[IPv4Address, str]:
    """(address, one of the ways inet_aton would read it): 1 to 4 parts, any bases."""
    ip = draw(addresses)
    n_parts = draw(st.integers(1, 4))
    packed = ip.packed
    numbers = [*packed[: n_parts - 1], int.from_bytes(packed[n_parts - 1 :], "big")]
    spell: list[Callable[[int], str]] = [_decimal, _octal, _hex, _hex_upper]
    parts = [draw(st.sampled_from(spell))(n) for n in numbers]
    return ip, ".".join(parts) + draw(st.sampled_from(["", "."]))


REQUIRED_NOT_PUBLIC = [
    IPv4Network(net)
    for net in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
]


@st.composite
def not_public_ipv4(draw: st.DrawFn) -> IPv4Address:
    net = draw(st.sampled_from(REQUIRED_NOT_PUBLIC))
    return net[draw(st.integers(0, net.num_addresses - 1))]


any_ipv4 = st.integers(0, 2**32 - 1).map(IPv4Address)


@given(spellings(any_ipv4))
def test_every_spelling_parses_to_its_address(case: tuple[IPv4Address, str]) -> None:
    ip, host = case
    assert parse_host_address(host) == ip


@given(spellings(not_public_ipv4()))
def test_every_spelling_of_a_non_public_address_is_refused(case: tuple[IPv4Address, str]) -> None:
    ip, host = case
    assert not is_public_address(ip)
    with pytest.raises(MediaNotAllowed):
        check_url(f"http://{host}:8080/x.png", FetchPolicy())


@given(spellings(any_ipv4))
def test_only_the_dotted_quad_is_accepted_even_when_private_is_allowed(
    case: tuple[IPv4Address, str],
) -> None:
    ip, host = case
    policy = FetchPolicy(allow_private=True)
    if host == str(ip):
        assert check_url(f"http://{host}/", policy).raw_host == host
    else:
        with pytest.raises(MediaNotAllowed, match="non-canonical"):
            check_url(f"http://{host}/", policy)


@given(any_ipv4)
def test_embedded_ipv4_decides(ip: IPv4Address) -> None:
    mapped = IPv6Address(f"::ffff:{ip}")
    nat64 = IPv6Address(int(IPv6Address("64:ff9b::")) | int(ip))
    sixtofour = IPv6Address((0x2002 << 112) | (int(ip) << 80) | 1)
    for v6 in (mapped, nat64, sixtofour):
        assert is_public_address(v6) == is_public_address(ip), v6


@given(st.integers(0, 2**128 - 1).map(IPv6Address))
def test_ipv6_outside_global_unicast_is_not_public(ip: IPv6Address) -> None:
    embeds_ipv4 = ip.ipv4_mapped is not None or ip in IPv6Network("64:ff9b::/96")
    if ip not in IPv6Network("2000::/3") and not embeds_ipv4:
        assert not is_public_address(ip)


# --- check_url ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/a.png",
        "gopher://example.com:70/_x",
        "file:///etc/passwd",
        "data:image/png;base64,YQ==",
        "javascript:alert(1)",
        "ws://example.com/",
        "dict://example.com:11211/",
    ],
)
def test_only_http_and_https(url: str) -> None:
    with pytest.raises(MediaNotAllowed, match="scheme"):
        check_url(url, FetchPolicy(allow_private=True))


@pytest.mark.parametrize(
    "url",
    [
        "http://user:secret@example.com/a.png",
        "http://user@example.com/a.png",
        "https://:secret@example.com/a.png",
        "http://example.com@127.0.0.1/a.png",
    ],
)
def test_credentials_are_refused_and_not_echoed(url: str) -> None:
    with pytest.raises(MediaNotAllowed, match="credentials") as info:
        check_url(url, FetchPolicy(allow_private=True))
    assert "secret" not in info.value.message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.0.0.1:8080/img.png",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[fe80::1%25eth0]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://0.0.0.0/",
        "http://[::]/",
    ],
)
def test_non_public_literals_refused_unless_allowed(url: str) -> None:
    with pytest.raises(MediaNotAllowed, match="not a public address"):
        check_url(url, FetchPolicy())
    assert check_url(url, FetchPolicy(allow_private=True)).raw_host


@pytest.mark.parametrize(
    "url", ["http://ex%41mple.com/", "http://exa mple.com/", "http://-x.com/", "http://./"]
)
def test_malformed_host_names_are_refused(url: str) -> None:
    with pytest.raises(MediaNotAllowed, match="host"):
        check_url(url, FetchPolicy())


@pytest.mark.parametrize("url", ["http:///img.png", "http://", "http:/127.0.0.1/x"])
def test_a_url_needs_a_host(url: str) -> None:
    with pytest.raises(MediaNotAllowed, match="no host"):
        check_url(url, FetchPolicy())


@pytest.mark.parametrize("url", ["http://example.com:99999/", "http://[::1/"])
def test_invalid_url(url: str) -> None:
    """Refused, not merely undecodable: a caller may hand plain MediaErrors to upstream."""
    with pytest.raises(MediaNotAllowed, match="not a valid URL"):
        check_url(url, FetchPolicy())


def test_idna_host_is_checked_as_resolved() -> None:
    """'⒈' is '1.' after IDNA mapping, which is 0.0.0.1: the parsed host is what counts."""
    with pytest.raises(MediaNotAllowed, match=r"0\.0\.0\.1"):
        check_url("http://\u2488/", FetchPolicy())


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.example.com/cat.png?size=large",
        "http://8.8.8.8/x.png",
        "http://[2606:4700:4700::1111]:8080/x.png",
        "http://images.example.com./x.png",
    ],
)
def test_public_urls_pass_and_come_back_parsed(url: str) -> None:
    parsed = check_url(url, FetchPolicy())
    assert str(parsed) == url


# --- FetchPolicy -------------------------------------------------------------------------


def test_policy_defaults_and_frozen() -> None:
    policy = FetchPolicy()
    assert (policy.allow_private, policy.max_bytes, policy.max_redirects) == (False, 20 << 20, 5)
    assert policy.media_root is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.allow_private = True  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_bytes": 0}, {"timeout_s": 0.0}, {"timeout_s": float("nan")}, {"max_redirects": -1}],
)
def test_policy_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        FetchPolicy(**kwargs)  # type: ignore[arg-type]


def test_docstring_examples() -> None:
    """The examples in proxy.images.ssrf's docstrings run and say what they show."""
    result = doctest.testmod(ssrf, extraglobs={"Path": Path}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
