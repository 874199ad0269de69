"""The CNI specification (0.4.0, 1.0.0, 1.1.0) as pure data and functions: no I/O here.

What the runtime hands a plugin — the ``CNI_*`` variables (:class:`Env`) and
the network configuration on stdin (:class:`NetConf`) — is decoded and
validated here, and what the plugin hands back — a result (:class:`Result`),
a version report or an error object (:class:`CniError`) — is rendered here in
the configuration's ``cniVersion``. The shell (:mod:`stockade.cni.plugin`)
only reads the environment, calls these, does the effects and prints.

Checks run in the order the reference library (``skel``) runs them, so a
runtime sees the same code for the same mistake whichever plugin it calls:
missing variables (4), undecodable JSON (6), the network name (7), the
container ID and interface name (4), the version (1), then the plugin's own
configuration (7).

Version differences that matter for results:

* 0.4.0 IP configurations carry ``"version": "4"|"6"``; 1.0.0 dropped it.
* 1.1.0 added interface ``mtu``/``socketPath``/``pciID`` and route
  ``mtu``/``advmss``/``priority``/``table``/``scope``; older versions omit them.
* CHECK exists from 0.4.0, GC and STATUS from 1.1.0; a command newer than the
  configuration's version is refused with code 1, as ``skel`` does.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
LATEST = VERSIONS[-1]

# ---- error codes -------------------------------------------------------------------------
# Well-known codes (the spec reserves 0-99).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN = 11
NOT_AVAILABLE = 50  # STATUS: cannot serve ADD now
LIMITED_CONNECTIVITY = 51  # STATUS: and existing containers may be cut off
# stockade's own (>= 100).
INTERNAL = 100  # an unexpected failure: a bug; details say where
PLUMBING = 101  # the kernel refused a link, address or route change
CHECK_FAILED = 102  # CHECK: interface, address or route not as the result says
NOT_ENFORCED = 103  # CHECK: the agent does not know or does not enforce the endpoint
AGENT_REFUSED = 104  # the agent rejected the endpoint (e.g. invalid labels)
AGENT_OUTDATED = 105  # the agent does not serve the CNI operations (no extension)
ATTACHMENT_EXISTS = 106  # ADD: CNI_IFNAME exists in the namespace and is not ours

COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
# The first spec version that knows a command.
COMMAND_SINCE = {"ADD": "0.4.0", "DEL": "0.4.0", "CHECK": "0.4.0", "GC": "1.1.0",
                 "STATUS": "1.1.0", "VERSION": "0.4.0"}
# Variables a command needs (as skel requires them); CNI_ARGS is always optional.
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
    "VERSION": (),
}
ATTACHMENT_COMMANDS = ("ADD", "DEL", "CHECK")

MODE_MAIN = "main"
MODE_CHAINED = "chained"
IPAM_AGENT = "stockade"  # the agent's address pool; any other ipam.type is a plugin
DEFAULT_BRIDGE = "stkbr0"  # the agent's default: bridge prefix "stk" + "br0"
DEFAULT_DATA_DIR = "/var/lib/stockade/cni"
DEFAULT_NAMESPACE = "default"
DEFAULT_VETH_PREFIX = "stkc"  # not the agent's "stk": `stockade run` names its veths so
VALID_ATTACHMENTS = "cni.dev/valid-attachments"
# libcni also sends the name an early draft used (containernetworking/cni#1101).
VALID_ATTACHMENTS_ALIAS = "cni.dev/attachments"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", re.ASCII)  # fullmatch: "$" takes a "\n"
_IFNAME_BAD = re.compile(r"[/:\s\0]")
_VETH_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,5}$")
IFNAMSIZ = 15


class CniError(Exception):
    """The spec's error object: a code, a short message and optional details."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def version_key(version: str) -> tuple[int, ...]:
    """"1.0.0" → (1, 0, 0); raises ValueError for anything that is not x.y.z."""
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(version)
    return tuple(int(p) for p in parts)


def at_least(version: str, floor: str) -> bool:
    return version_key(version) >= version_key(floor)


def error_version(requested: str | None) -> str:
    """The version an error object is rendered in: the request's when we speak it."""
    return requested if requested in VERSIONS else LATEST


def version_report(requested: str | None) -> dict[str, Any]:
    """VERSION's answer, in the version asked for when we support it."""
    return {"cniVersion": error_version(requested), "supportedVersions": list(VERSIONS)}


def highest_common(ours: Sequence[str], theirs: Sequence[str]) -> str | None:
    """The newest version both sides speak (how a delegate's version is negotiated)."""
    common = []
    for v in set(ours) & set(theirs):
        try:
            common.append((version_key(v), v))
        except ValueError:
            continue
    return max(common)[1] if common else None


# ---- names -------------------------------------------------------------------------------


def validate_container_id(value: str) -> None:
    if not value:
        raise CniError(UNKNOWN_CONTAINER, "missing containerID")
    if not _ID.fullmatch(value):
        raise CniError(INVALID_ENVIRONMENT, "invalid characters in containerID", value)


def validate_ifname(value: str) -> None:
    """Linux's rules for interface names, as the spec words them."""
    if not value:
        raise CniError(INVALID_ENVIRONMENT, "interface name is empty")
    if len(value.encode()) > IFNAMSIZ:
        raise CniError(INVALID_ENVIRONMENT, "interface name is too long",
                       f"interface name should be less than {IFNAMSIZ + 1} characters")
    if value in (".", ".."):
        raise CniError(INVALID_ENVIRONMENT, "interface name is . or ..")
    if _IFNAME_BAD.search(value):
        raise CniError(INVALID_ENVIRONMENT,
                       "interface name contains / or : or whitespace characters")


def validate_network_name(value: str) -> None:
    if not value:
        raise CniError(INVALID_CONFIG, "missing network name")
    if not _ID.fullmatch(value):
        raise CniError(INVALID_CONFIG, "invalid characters found in network name", value)


# ---- the environment ---------------------------------------------------------------------


@dataclass(frozen=True)
class Env:
    """The ``CNI_*`` variables of one invocation, checked for its command."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    path: tuple[str, ...] = ()
    # The whole environment the runtime gave: a delegated IPAM plugin inherits it
    # (the plugin's own process environment, or the thin plugin's, sent to the agent).
    inherited: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)


def parse_cni_args(text: str) -> dict[str, str]:
    """``"K8S_POD_NAMESPACE=x;K8S_POD_NAME=y"`` → a dict; a pair without ``=`` is an error."""
    out: dict[str, str] = {}
    for item in text.split(";"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENVIRONMENT, "invalid CNI_ARGS pair", item)
        out[key] = value
    return out


def parse_env(environ: Mapping[str, str]) -> Env:
    """The invocation's variables; missing or unknown ones fail with code 4.

    Names are validated later (:func:`check_names`), after the configuration
    has been decoded, as skel orders it.
    """
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CniError(INVALID_ENVIRONMENT, "required env variables [CNI_COMMAND] missing")
    if command not in COMMANDS:
        raise CniError(INVALID_ENVIRONMENT, f"unknown CNI_COMMAND: {command}")
    missing = [v for v in REQUIRED_ENV[command] if not environ.get(v)]
    if missing:
        raise CniError(INVALID_ENVIRONMENT,
                       f"required env variables [{','.join(missing)}] missing")
    if command == "VERSION":
        return Env(command)
    return Env(
        command=command,
        container_id=environ.get("CNI_CONTAINERID", ""),
        netns=environ.get("CNI_NETNS", ""),
        ifname=environ.get("CNI_IFNAME", ""),
        args=parse_cni_args(environ.get("CNI_ARGS", "")),
        path=tuple(p for p in environ.get("CNI_PATH", "").split(":") if p),
        inherited=dict(environ),
    )


def check_names(env: Env) -> None:
    """Container ID and interface name, for the commands that carry them."""
    if env.command in ATTACHMENT_COMMANDS:
        validate_container_id(env.container_id)
        validate_ifname(env.ifname)


# ---- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""
    mtu: int | None = None  # 1.1.0
    socket_path: str = ""  # 1.1.0
    pci_id: str = ""  # 1.1.0


@dataclass(frozen=True)
class IPConfig:
    address: str  # with prefix length, "10.244.0.5/16"
    gateway: str = ""
    interface: int | None = None  # index into Result.interfaces

    @property
    def version(self) -> int:
        return ipaddress.ip_interface(self.address).version

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_interface(self.address).ip)


@dataclass(frozen=True)
class Route:
    dst: str
    gw: str = ""
    mtu: int | None = None  # 1.1.0 from here on
    advmss: int | None = None
    priority: int | None = None
    table: int | None = None
    scope: int | None = None


@dataclass(frozen=True)
class DNS:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Result:
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = DNS()

    def render(self, version: str) -> dict[str, Any]:
        """The result as the given spec version writes it."""
        new = at_least(version, "1.1.0")
        out: dict[str, Any] = {"cniVersion": version}
        if self.interfaces:
            out["interfaces"] = [_render_interface(i, new) for i in self.interfaces]
        if self.ips:
            out["ips"] = [_render_ip(ip, version) for ip in self.ips]
        if self.routes:
            out["routes"] = [_render_route(r, new) for r in self.routes]
        out["dns"] = _render_dns(self.dns)
        return out

    def sandbox_interface(self, ifname: str, netns: str = "") -> int | None:
        """Index of the container's interface: that name, in a sandbox (that one if given)."""
        fallback = None
        for index, iface in enumerate(self.interfaces):
            if iface.name == ifname and iface.sandbox:
                if not netns or iface.sandbox == netns:
                    return index
                fallback = index
        return fallback

    def container_ips(self, ifname: str, netns: str = "") -> tuple[IPConfig, ...]:
        """The addresses of the container's interface (all of them if none is indexed)."""
        index = self.sandbox_interface(ifname, netns)
        mine = tuple(ip for ip in self.ips if index is not None and ip.interface == index)
        if mine:
            return mine
        return tuple(ip for ip in self.ips if ip.interface is None)


def _render_interface(i: Interface, new: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"name": i.name}
    if i.mac:
        out["mac"] = i.mac
    if i.sandbox:
        out["sandbox"] = i.sandbox
    if new:
        if i.mtu is not None:
            out["mtu"] = i.mtu
        if i.socket_path:
            out["socketPath"] = i.socket_path
        if i.pci_id:
            out["pciID"] = i.pci_id
    return out


def _render_ip(ip: IPConfig, version: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not at_least(version, "1.0.0"):
        out["version"] = str(ip.version)
    out["address"] = ip.address
    if ip.gateway:
        out["gateway"] = ip.gateway
    if ip.interface is not None:
        out["interface"] = ip.interface
    return out


def _render_route(r: Route, new: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"dst": r.dst}
    if r.gw:
        out["gw"] = r.gw
    if new:
        for key, value in (("mtu", r.mtu), ("advmss", r.advmss), ("priority", r.priority),
                           ("table", r.table), ("scope", r.scope)):
            if value is not None:
                out[key] = value
    return out


def _render_dns(d: DNS) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if d.nameservers:
        out["nameservers"] = list(d.nameservers)
    if d.domain:
        out["domain"] = d.domain
    if d.search:
        out["search"] = list(d.search)
    if d.options:
        out["options"] = list(d.options)
    return out


def parse_result(raw: Any, what: str = "result") -> Result:
    """A result of any supported version (0.4.0's ``version`` fields are ignored).

    Raises CniError(DECODING_FAILURE) naming the offending field.
    """
    obj = _object(raw, what)
    interfaces = tuple(_parse_interface(x, f"{what}.interfaces[{n}]")
                       for n, x in enumerate(_array(obj.get("interfaces"), f"{what}.interfaces")))
    ips = tuple(_parse_ip(x, f"{what}.ips[{n}]", len(interfaces))
                for n, x in enumerate(_array(obj.get("ips"), f"{what}.ips")))
    routes = tuple(_parse_route(x, f"{what}.routes[{n}]")
                   for n, x in enumerate(_array(obj.get("routes"), f"{what}.routes")))
    dns_raw = obj.get("dns")
    dns = DNS() if dns_raw is None else _parse_dns(_object(dns_raw, f"{what}.dns"),
                                                   f"{what}.dns")
    return Result(interfaces, ips, routes, dns)


def convert_result(raw: Mapping[str, Any], version: str) -> dict[str, Any]:
    """A result in another version; one already in that version passes unchanged.

    Unchanged means byte for byte what the previous plugin said, unknown
    fields included: a chained plugin hands its ``prevResult`` on.
    """
    if raw.get("cniVersion") == version:
        return dict(raw)
    return parse_result(raw, "prevResult").render(version)


def _decode_fail(what: str, expected: str, value: Any) -> CniError:
    return CniError(DECODING_FAILURE, f"{what}: expected {expected}", json.dumps(value)[:200])


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _decode_fail(what, "an object", value)
    return value


def _array(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _decode_fail(what, "an array", value)
    return value


def _str(obj: Mapping[str, Any], key: str, what: str, required: bool = False) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise CniError(DECODING_FAILURE, f"{what}.{key} is required")
        return ""
    if not isinstance(value, str):
        raise _decode_fail(f"{what}.{key}", "a string", value)
    return value


def _int(obj: Mapping[str, Any], key: str, what: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _decode_fail(f"{what}.{key}", "an integer", value)
    return value


def _strings(value: Any, what: str) -> tuple[str, ...]:
    items = _array(value, what)
    if not all(isinstance(x, str) for x in items):
        raise _decode_fail(what, "an array of strings", value)
    return tuple(items)


def _parse_interface(raw: Any, what: str) -> Interface:
    obj = _object(raw, what)
    return Interface(_str(obj, "name", what, required=True), _str(obj, "mac", what),
                     _str(obj, "sandbox", what), _int(obj, "mtu", what),
                     _str(obj, "socketPath", what), _str(obj, "pciID", what))


def _parse_ip(raw: Any, what: str, interfaces: int) -> IPConfig:
    obj = _object(raw, what)
    address = _str(obj, "address", what, required=True)
    try:
        ipaddress.ip_interface(address)
    except ValueError:
        raise _decode_fail(f"{what}.address", "an address with prefix length", address) \
            from None
    if "/" not in address:
        raise _decode_fail(f"{what}.address", "an address with prefix length", address)
    gateway = _str(obj, "gateway", what)
    if gateway:
        _ip(gateway, f"{what}.gateway")
    index = _int(obj, "interface", what)
    if index is not None and not 0 <= index < interfaces:
        raise _decode_fail(f"{what}.interface", f"an index below {interfaces}", index)
    return IPConfig(address, gateway, index)


def _ip(text: str, what: str) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise _decode_fail(what, "an IP address", text) from None


def _parse_route(raw: Any, what: str) -> Route:
    obj = _object(raw, what)
    dst = _str(obj, "dst", what, required=True)
    try:
        ipaddress.ip_network(dst, strict=False)
    except ValueError:
        raise _decode_fail(f"{what}.dst", "a CIDR", dst) from None
    gw = _str(obj, "gw", what)
    if gw:
        _ip(gw, f"{what}.gw")
    return Route(dst, gw, _int(obj, "mtu", what), _int(obj, "advmss", what),
                 _int(obj, "priority", what), _int(obj, "table", what),
                 _int(obj, "scope", what))


def _parse_dns(obj: Mapping[str, Any], what: str) -> DNS:
    return DNS(_strings(obj.get("nameservers"), f"{what}.nameservers"),
               _str(obj, "domain", what), _strings(obj.get("search"), f"{what}.search"),
               _strings(obj.get("options"), f"{what}.options"))


# ---- the network configuration -----------------------------------------------------------


@dataclass(frozen=True)
class NetConf:
    """One plugin's configuration as the runtime hands it over, checked.

    ``mode`` is "main", "chained" or "" (not given: ADD infers it from
    ``prevResult``; DEL and CHECK use what ADD recorded). ``ipam`` is None for
    the agent's pool, else the section to hand to the IPAM plugin it names.
    ``labels`` is None when no source gave any: the agent's record applies.
    """

    cni_version: str
    name: str
    type: str
    mode: str = ""
    bridge: str = DEFAULT_BRIDGE
    veth_prefix: str = DEFAULT_VETH_PREFIX
    is_gateway: bool = True
    mtu: int | None = None
    ipam: Mapping[str, Any] | None = None
    data_dir: str = DEFAULT_DATA_DIR
    socket: str = ""
    namespace: str = DEFAULT_NAMESPACE
    labels: Mapping[str, str] | None = None
    prev_result: Mapping[str, Any] | None = None
    valid_attachments: tuple[tuple[str, str], ...] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


def decode_json(data: bytes, what: str = "network configuration") -> Mapping[str, Any]:
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(DECODING_FAILURE, f"error parsing {what}", str(exc)) from None
    if not isinstance(raw, dict):
        raise CniError(DECODING_FAILURE, f"error parsing {what}", "not a JSON object")
    return raw


def requested_version(data: bytes) -> str | None:
    """The ``cniVersion`` asked for, if stdin is readable at all (for error objects)."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    value = raw.get("cniVersion") if isinstance(raw, dict) else None
    return value if isinstance(value, str) else None


def check_version(raw: Mapping[str, Any], command: str) -> str:
    """The configuration's version, if we speak it and it knows the command."""
    version = raw.get("cniVersion", "")
    if not isinstance(version, str) or not version:
        raise CniError(DECODING_FAILURE, "cniVersion must be a non-empty string",
                       json.dumps(version))
    if version not in VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config is {version!r}, plugin supports {list(VERSIONS)}")
    since = COMMAND_SINCE[command]
    if not at_least(version, since):
        raise CniError(INCOMPATIBLE_VERSION, f"config version does not allow {command}",
                       f"{command} needs cniVersion {since} or later, config is {version}")
    return version


def parse_conf(data: bytes, env: Env) -> NetConf:
    """Decode, check in skel's order, and read stockade's fields."""
    raw = decode_json(data)
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise CniError(DECODING_FAILURE, "error parsing network configuration",
                       "name must be a string")
    validate_network_name(name or "")
    check_names(env)
    version = check_version(raw, env.command)
    return _netconf(raw, version, str(name))


def _bad(msg: str, details: Any = "") -> CniError:
    return CniError(INVALID_CONFIG, msg, details if isinstance(details, str)
                    else json.dumps(details))


def _conf_str(raw: Mapping[str, Any], key: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise _bad(f"{key} must be a string", value)
    return value


def _netconf(raw: Mapping[str, Any], version: str, name: str) -> NetConf:
    ptype = _conf_str(raw, "type", "")
    mode = _conf_str(raw, "mode", "")
    if mode not in ("", MODE_MAIN, MODE_CHAINED):
        raise _bad("mode must be \"main\" or \"chained\"", mode)
    bridge = _conf_str(raw, "bridge", DEFAULT_BRIDGE)
    if not bridge or len(bridge.encode()) > IFNAMSIZ or _IFNAME_BAD.search(bridge):
        raise _bad("bridge must be an interface name of 1 to 15 bytes", bridge)
    prefix = _conf_str(raw, "vethPrefix", DEFAULT_VETH_PREFIX)
    if not _VETH_PREFIX.match(prefix):
        raise _bad("vethPrefix must be 1 to 6 lowercase letters or digits, starting "
                   "with a letter", prefix)
    data_dir = _conf_str(raw, "dataDir", DEFAULT_DATA_DIR)
    if not data_dir.startswith("/"):
        raise _bad("dataDir must be an absolute path", data_dir)
    is_gateway = raw.get("isGateway", True)
    if not isinstance(is_gateway, bool):
        raise _bad("isGateway must be true or false", is_gateway)
    mtu = raw.get("mtu")
    if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int)
                            or not 68 <= mtu <= 65535):
        raise _bad("mtu must be an integer from 68 to 65535", mtu)
    return NetConf(
        cni_version=version, name=name, type=ptype, mode=mode, bridge=bridge,
        veth_prefix=prefix, is_gateway=is_gateway, mtu=mtu, ipam=_ipam(raw),
        data_dir=data_dir, socket=_conf_str(raw, "socket", ""),
        namespace=_conf_str(raw, "namespace", DEFAULT_NAMESPACE), labels=_labels(raw),
        prev_result=_prev_result(raw), valid_attachments=_valid_attachments(raw), raw=raw)


def _ipam(raw: Mapping[str, Any]) -> Mapping[str, Any] | None:
    section = raw.get("ipam")
    if section is None or section == {}:
        return None
    if not isinstance(section, Mapping):
        raise _bad("ipam must be an object", section)
    kind = section.get("type")
    if not isinstance(kind, str) or not kind:
        raise _bad("ipam.type must name an IPAM plugin (or \"stockade\")", section)
    if kind == IPAM_AGENT:
        return None
    if not _ID.match(kind):
        raise _bad("ipam.type is not a plugin name", kind)
    return section


def _label_map(value: Any, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _bad(f"{where} must be an object of strings", value)
    return dict(value)


def _labels(raw: Mapping[str, Any]) -> Mapping[str, str] | None:
    """Labels from ``args.cni.labels``, ``args.labels``, ``runtimeConfig.labels`` (later wins)."""
    args = raw.get("args")
    runtime = raw.get("runtimeConfig")
    if args is not None and not isinstance(args, Mapping):
        raise _bad("args must be an object", args)
    if runtime is not None and not isinstance(runtime, Mapping):
        raise _bad("runtimeConfig must be an object", runtime)
    cni = (args or {}).get("cni")
    if cni is not None and not isinstance(cni, Mapping):
        raise _bad("args.cni must be an object", cni)
    found = [_label_map((cni or {}).get("labels"), "args.cni.labels"),
             _label_map((args or {}).get("labels"), "args.labels"),
             _label_map((runtime or {}).get("labels"), "runtimeConfig.labels")]
    present = [f for f in found if f is not None]
    if not present:
        return None
    merged: dict[str, str] = {}
    for part in present:
        merged.update(part)
    return merged


def _prev_result(raw: Mapping[str, Any]) -> Mapping[str, Any] | None:
    prev = raw.get("prevResult")
    if prev is None:
        return None
    if not isinstance(prev, Mapping):
        raise _bad("prevResult must be an object", prev)
    parse_result(prev, "prevResult")  # decodable, or code 6 now rather than later
    return prev


def _valid_attachments(raw: Mapping[str, Any]) -> tuple[tuple[str, str], ...] | None:
    value = raw.get(VALID_ATTACHMENTS, raw.get(VALID_ATTACHMENTS_ALIAS))
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad(f"{VALID_ATTACHMENTS} must be an array", value)
    out = []
    for item in value:
        if not isinstance(item, Mapping) or not isinstance(item.get("containerID"), str):
            raise _bad(f"{VALID_ATTACHMENTS} entries need a containerID", item)
        ifname = item.get("ifname", "")
        if not isinstance(ifname, str):
            raise _bad(f"{VALID_ATTACHMENTS} ifname must be a string", item)
        out.append((item["containerID"], ifname))
    return tuple(out)


# ---- what the plugin decides from a configuration (still pure) ---------------------------


def effective_mode(conf: NetConf) -> str:
    """The configured mode, else chained when a previous plugin made an interface."""
    if conf.mode:
        return conf.mode
    if conf.prev_result is not None and parse_result(conf.prev_result).interfaces:
        return MODE_CHAINED
    return MODE_MAIN


def endpoint_identity(conf: NetConf, env: Env) -> tuple[str, str]:
    """The endpoint's namespace and name: the Kubernetes pod's, else the container's.

    Runtimes for Kubernetes pass ``K8S_POD_NAMESPACE``/``K8S_POD_NAME`` in
    CNI_ARGS (podman passes ``K8S_POD_NAME`` = the container's name, and
    propagates its own CNI_ARGS); policies then select it like the pod.
    """
    namespace = env.args.get("K8S_POD_NAMESPACE") or conf.namespace
    name = env.args.get("K8S_POD_NAME") or env.container_id
    return namespace, name


def require_prev_result(conf: NetConf, command: str) -> Result:
    if conf.prev_result is None:
        raise CniError(INVALID_CONFIG, f"{command} needs prevResult",
                       "the runtime passes the result of the previous ADD")
    return parse_result(conf.prev_result, "prevResult")


def delegate_conf(conf: NetConf, version: str) -> bytes:
    """The configuration handed to a delegated IPAM plugin: ours, in its version."""
    raw = dict(conf.raw)
    raw["cniVersion"] = version
    if version != conf.cni_version and "prevResult" in raw and conf.prev_result is not None:
        raw["prevResult"] = convert_result(conf.prev_result, version)
    return json.dumps(raw, separators=(",", ":")).encode()


def main_result(ifname: str, netns: str, mac: str, host_ifname: str, host_mac: str,
                ips: Sequence[IPConfig], routes: Sequence[Route], dns: DNS,
                mtu: int | None) -> Result:
    """Main mode's ADD result: host veth first, then the container's interface."""
    host = Interface(host_ifname, host_mac, "", mtu)
    inner = Interface(ifname, mac, netns, mtu)
    return Result((host, inner),
                  tuple(IPConfig(ip.address, ip.gateway, 1) for ip in ips),
                  tuple(routes), dns)


def effective_routes(routes: Sequence[Route], ips: Sequence[IPConfig]) -> tuple[Route, ...]:
    """Routes as the kernel gets them: one without ``gw`` goes via its family's gateway.

    That is the reference plugins' convention for IPAM routes such as
    ``{"dst": "0.0.0.0/0"}``; the result keeps the route as the IPAM gave it.
    """
    gateways: dict[int, str] = {}
    for ip in ips:
        if ip.gateway:
            gateways.setdefault(ip.version, ip.gateway)
    out = []
    for r in routes:
        version = ipaddress.ip_network(r.dst, strict=False).version
        out.append(r if r.gw or version not in gateways else
                   Route(r.dst, gateways[version], r.mtu, r.advmss, r.priority, r.table,
                         r.scope))
    return tuple(out)


def default_routes(ips: Sequence[IPConfig]) -> tuple[Route, ...]:
    """A default route per family that has a gateway (what main mode sets up)."""
    out: list[Route] = []
    seen: set[int] = set()
    for ip in ips:
        if ip.gateway and ip.version not in seen:
            seen.add(ip.version)
            out.append(Route("0.0.0.0/0" if ip.version == 4 else "::/0", ip.gateway))
    return tuple(out)
