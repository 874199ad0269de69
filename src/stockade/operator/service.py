"""MicroService (stockade.io/v1alpha1) as frozen data: decoding and validation (pure).

A MicroService names a set of pods in its namespace (a label selector), the
ports they serve, and the services they call::

    apiVersion: stockade.io/v1alpha1
    kind: MicroService
    metadata: {name: api, namespace: backend, uid: ...}
    spec:
      selector: {matchLabels: {app: api}}
      ports: [{name: http, port: 8080, protocol: TCP}]
      dependsOn: [{name: postgres, namespace: db, ports: [postgres]}]
      isolation: {ingress: true, egress: false}

Decoding is strict like the project's NetworkPolicy decoding (`model.decode`): an
unknown field or a value of the wrong type raises DecodeError naming the field;
`status` is read over (the operator writes it) and so is the content of metadata
fields other than name, namespace, uid, labels and annotations (the API server
has checked them). Defaults are applied here: a port's protocol is TCP, a
dependency's namespace is the service's own, isolation is ingress on, egress off.

Validation returns every error, worded as the API server words them
(`spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535,
inclusive`). Beyond types, the rules are:

* `metadata.name` is a DNS-1123 label (at most 63 characters, as a Service's), so
  the generated `<name>-ingress` / `<name>-egress` are valid policy names;
  `metadata.namespace` a DNS-1123 label; `metadata.uid` is required, since every
  generated policy's ownerReference carries it (the API server always sets it;
  offline files must give one).
* `spec.selector` is required and not empty: an empty selector would make the
  service every pod of its namespace and its policies namespace-wide.
* `spec.ports[*]`: a name (an IANA service name, unique in the service), a port
  1-65535, a protocol TCP, UDP or SCTP; a port and protocol are declared once.
* `spec.dependsOn[*]`: a name and namespace (DNS-1123 labels); `ports` are names
  (IANA service names) or numbers (1-65535), each given once, at least one when
  the field is given (omitted: every port); one entry per target.
  Whether the target exists and serves those ports is a question about the graph,
  answered by `render` as findings, not here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from stockade.errors import DecodeError, InputError, ValidationError
from stockade.model import names
from stockade.model.decode import (
    StrictReader,
    decode_selector,
    join_path,
    object_name,
    read_boolean,
    read_int32,
    read_list,
    read_string,
    read_string_map,
    type_meta,
    wrong_type,
)
from stockade.model.field import INVALID, REQUIRED, UNSUPPORTED, FieldError, invalid_each
from stockade.model.labels import EMPTY, Labels
from stockade.model.parse import expand_lists
from stockade.model.policy import NO_SOURCE, PROTOCOLS, TCP, Source
from stockade.model.selector import Selector
from stockade.model.validate import validate_labels, validate_selector

T = TypeVar("T")

GROUP = "stockade.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "MicroService"
PLURAL = "microservices"

DUPLICATE = "Duplicate value"
INT32_MAX = 2**31 - 1

_TOP_LEVEL = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
_META = frozenset({
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
    "annotations", "ownerReferences", "finalizers", "managedFields",
})
_SPEC = frozenset({"selector", "ports", "dependsOn", "isolation"})
_PORT = frozenset({"name", "port", "protocol"})
_DEPENDENCY = frozenset({"name", "namespace", "ports"})
_ISOLATION = frozenset({"ingress", "egress"})


@dataclass(frozen=True)
class ServicePort:
    """A port the service's pods serve."""

    name: str
    port: int
    protocol: str = TCP

    def render(self) -> str:
        return f"{self.protocol}/{self.port}"


@dataclass(frozen=True)
class Dependency:
    """A service this one calls; `ports` None (omitted) means every port the target declares."""

    name: str
    namespace: str
    ports: tuple[int | str, ...] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Isolation:
    ingress: bool = True
    egress: bool = False


@dataclass(frozen=True)
class MicroService:
    namespace: str
    name: str
    uid: str
    selector: Selector | None  # None: absent, which validation refuses
    ports: tuple[ServicePort, ...] = ()
    depends_on: tuple[Dependency, ...] = ()
    isolation: Isolation = Isolation()
    labels: Labels = EMPTY
    annotations: Labels = EMPTY
    source: Source = field(default=NO_SOURCE, compare=False, hash=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def ports_named(self, ref: int | str) -> tuple[ServicePort, ...]:
        """The declared ports a dependency's entry means: by name, or every protocol of a number."""
        if isinstance(ref, str):
            return tuple(p for p in self.ports if p.name == ref)
        return tuple(p for p in self.ports if p.port == ref)


# --- decoding ---------------------------------------------------------------------


def _int_or_string(value: Any, path: str) -> int | str:
    if isinstance(value, str):
        return value
    if value is None:
        raise wrong_type(path, value, "an int or a string")
    return read_int32(value, path)


def _boolean(value: Any, path: str, default: bool) -> bool:
    return default if value is None else read_boolean(value, path)


class _Reader(StrictReader):
    """A MicroService's objects (its ports and dependencies)."""

    def items(self, value: Any, path: str, item: Callable[[Any, str], T]) -> tuple[T, ...]:
        return read_list(value, path, item)

    def port(self, value: Any, path: str) -> ServicePort:
        m = self.mapping(value, path, _PORT)
        protocol = m.get("protocol")
        port = m.get("port")
        return ServicePort(
            name=read_string(m.get("name"), join_path(path, "name")),
            port=0 if port is None else read_int32(port, join_path(path, "port")),
            protocol=(TCP if protocol is None
                      else read_string(protocol, join_path(path, "protocol"))),
        )

    def dependency(self, namespace: str) -> Callable[[Any, str], Dependency]:
        def decode(value: Any, path: str) -> Dependency:
            m = self.mapping(value, path, _DEPENDENCY)
            return Dependency(
                name=read_string(m.get("name"), join_path(path, "name")),
                namespace=(read_string(m.get("namespace"), join_path(path, "namespace"))
                           or namespace),
                ports=(None if m.get("ports") is None else
                       self.items(m.get("ports"), join_path(path, "ports"), _int_or_string)),
            )

        return decode


def decode_microservice(doc: Any, source: Source = NO_SOURCE,
                        default_namespace: str = "default") -> MicroService:
    """A MicroService document, decoded strictly, with its defaults applied."""
    type_meta(doc, KIND, (API_VERSION,))
    strict = _Reader()
    m = strict.mapping(doc, "", _TOP_LEVEL)
    meta = strict.mapping(m.get("metadata"), "metadata", _META)
    namespace = read_string(meta.get("namespace"), "metadata.namespace") or default_namespace
    spec = strict.mapping(m.get("spec"), "spec", _SPEC)
    if not isinstance(m.get("status"), dict | None):
        raise wrong_type("status", m.get("status"), "an object")
    iso = strict.mapping(spec.get("isolation"), "spec.isolation", _ISOLATION)
    service = MicroService(
        namespace=namespace,
        name=read_string(meta.get("name"), "metadata.name"),
        uid=read_string(meta.get("uid"), "metadata.uid"),
        selector=decode_selector(spec.get("selector"), "spec.selector"),
        ports=strict.items(spec.get("ports"), "spec.ports", strict.port),
        depends_on=strict.items(spec.get("dependsOn"), "spec.dependsOn",
                               strict.dependency(namespace)),
        isolation=Isolation(
            ingress=_boolean(iso.get("ingress"), "spec.isolation.ingress", True),
            egress=_boolean(iso.get("egress"), "spec.isolation.egress", False),
        ),
        labels=read_string_map(meta.get("labels"), "metadata.labels"),
        annotations=read_string_map(meta.get("annotations"), "metadata.annotations"),
        source=source,
    )
    strict.finish()
    return service


def is_microservice(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("kind") == KIND


def decode_microservices(docs: Sequence[Any], source: str = ""
                         ) -> tuple[list[MicroService], list[DecodeError], int]:
    """The MicroServices of a list of documents (`kind: List` expanded).

    Returns the services, the documents that cannot be decoded (each naming the
    file and object), and how many documents of other kinds were skipped.
    """
    services: list[MicroService] = []
    errors: list[DecodeError] = []
    skipped = 0
    for index, doc in expand_lists(list(docs)):
        if not is_microservice(doc):
            skipped += 1
            continue
        try:
            services.append(decode_microservice(doc, Source(source, index)))
        except DecodeError as exc:
            errors.append(DecodeError(exc.message.removeprefix(f"{exc.path}: "),
                                      path=exc.path, source=source,
                                      obj=object_name(doc) or f"document {index + 1}"))
    return services, errors, skipped


# --- validation -------------------------------------------------------------------


def validate_microservice(service: MicroService) -> list[FieldError]:
    """Every error of one MicroService, in field order."""
    errs: list[FieldError] = []
    if not service.name:
        errs.append(FieldError("metadata.name", REQUIRED, "name is required"))
    else:
        errs += invalid_each("metadata.name", service.name, names.is_dns1123_label(service.name))
    if not service.namespace:
        errs.append(FieldError("metadata.namespace", REQUIRED))
    else:
        errs += invalid_each("metadata.namespace", service.namespace,
                      names.is_dns1123_label(service.namespace))
    if not service.uid:
        errs.append(FieldError("metadata.uid", REQUIRED,
                               "the ownerReference of every generated NetworkPolicy needs it "
                               "(the API server sets it; give one when rendering offline)"))
    errs += validate_labels(service.labels, "metadata.labels")
    errs += _validate_selector(service.selector)
    errs += _validate_ports(service.ports)
    errs += _validate_dependencies(service.depends_on)
    return errs


def _validate_selector(selector: Selector | None) -> list[FieldError]:
    if selector is None:
        return [FieldError("spec.selector", REQUIRED, "must select the service's pods")]
    if selector.is_empty:
        return [FieldError("spec.selector", INVALID,
                           "must not be empty: it would select every pod of the namespace",
                           "{}")]
    return validate_selector(selector, "spec.selector")


def _validate_ports(ports: Sequence[ServicePort]) -> list[FieldError]:
    errs: list[FieldError] = []
    names_seen: dict[str, int] = {}
    ports_seen: dict[tuple[int, str], int] = {}
    for i, port in enumerate(ports):
        path = f"spec.ports[{i}]"
        if not port.name:
            errs.append(FieldError(f"{path}.name", REQUIRED))
        else:
            errs += invalid_each(f"{path}.name", port.name, names.is_valid_port_name(port.name))
            if port.name in names_seen:
                errs.append(FieldError(f"{path}.name", DUPLICATE,
                                       f"also the name of spec.ports[{names_seen[port.name]}]",
                                       port.name))
            else:
                names_seen[port.name] = i
        errs += invalid_each(f"{path}.port", port.port, names.is_valid_port_num(port.port))
        if port.protocol not in PROTOCOLS:
            errs.append(FieldError(f"{path}.protocol", UNSUPPORTED, _supported(PROTOCOLS),
                                   port.protocol))
        key = (port.port, port.protocol)
        if key in ports_seen:
            errs.append(FieldError(path, DUPLICATE,
                                   f"also declared by spec.ports[{ports_seen[key]}]",
                                   port.render()))
        else:
            ports_seen[key] = i
    return errs


def _validate_dependencies(deps: Sequence[Dependency]) -> list[FieldError]:
    errs: list[FieldError] = []
    seen: dict[str, int] = {}
    for i, dep in enumerate(deps):
        path = f"spec.dependsOn[{i}]"
        if not dep.name:
            errs.append(FieldError(f"{path}.name", REQUIRED))
        else:
            errs += invalid_each(f"{path}.name", dep.name, names.is_dns1123_label(dep.name))
        errs += invalid_each(f"{path}.namespace", dep.namespace,
                      names.is_dns1123_label(dep.namespace))
        if dep.key in seen:
            errs.append(FieldError(path, DUPLICATE,
                                   f"also the target of spec.dependsOn[{seen[dep.key]}]",
                                   dep.key))
        else:
            seen[dep.key] = i
        if dep.ports == ():
            errs.append(FieldError(f"{path}.ports", REQUIRED,
                                   "must name at least one port when given (omit it for every "
                                   "port the target declares)"))
        refs: set[int | str] = set()
        for j, ref in enumerate(dep.ports or ()):
            ref_path = f"{path}.ports[{j}]"
            if isinstance(ref, int):
                errs += invalid_each(ref_path, ref, names.is_valid_port_num(ref))
            else:
                errs += invalid_each(ref_path, ref, names.is_valid_port_name(ref))
            if ref in refs:
                errs.append(FieldError(ref_path, DUPLICATE, "given twice", ref))
            refs.add(ref)
    return errs



def _supported(values: Sequence[str]) -> str:
    return "supported values: " + ", ".join(f'"{v}"' for v in values)


# --- a set of services ------------------------------------------------------------


def admit_microservices(services: Sequence[MicroService]) -> list[InputError]:
    """Every invalid service (one ValidationError each) and every key given twice."""
    bad: list[InputError] = []
    first: dict[str, MicroService] = {}
    for svc in services:
        where = svc.source.render() if svc.source.file else ""
        errs = validate_microservice(svc)
        if svc.name and svc.key in first:
            other = first[svc.key].source.render()
            errs.append(FieldError("metadata.name", DUPLICATE,
                                   f"MicroService {svc.key} is also given in {other}", svc.name))
        first.setdefault(svc.key, svc)
        if errs:
            bad.append(ValidationError(errs, source=where,
                                       obj=f"{KIND} {svc.namespace}/{svc.name}"))
    return bad
