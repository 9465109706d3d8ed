"""Stand-ins for the Microsoft Defender XDR incidents API and the Microsoft Graph security incidents API.

One :class:`IncidentWorld` holds, per customer tenant, one list of incident records. Both APIs render
their own view of the same records, so a test can compare what each returned with ``world.truth()``:

- Defender XDR (``create_defender_app``): ``GET /api/incidents`` and ``GET /api/incidents/{id}``. PascalCase
  enums, integer ids, alerts (with devices and entities, most fields null) always inline. ``$filter`` on
  ``lastUpdateTime`` / ``createdTime`` (``eq ge gt le lt``), ``status eq``, ``assignedTo eq``, joined with
  ``and``; ``$top`` (default and maximum 100), ``$skip``, ``$orderby=lastUpdateTime asc|desc`` (default: most
  recent first). ``@odata.nextLink`` only when ``world.defender_next_link`` is on (undocumented upstream).
  Quota per tenant: 50 calls a minute and 1,500 an hour; a 429 carries ``{"error": {"code": "429",
  "message": "API calls quota exceeded! maximum allowed 50 per 00:01:00", ...}}`` and no ``Retry-After``.
- Graph (``create_graph_app``): ``GET /v1.0/security/incidents`` and ``/v1.0/security/incidents/{id}``. String
  ids, camelCase enums, ``tenantId`` on every incident, alerts only with ``$expand=alerts``. ``$top`` at most 50,
  ``@odata.nextLink`` whenever rows remain, ``$count``. Quota 150 calls a minute per tenant; a 429 carries
  ``Retry-After``.

The bearer token decides whose data a call sees: its ``tid`` claim selects the tenant, its ``roles`` must
hold the API's incident permission (else 403); a missing or invalid token is a 401. Before any of that, the
shared :class:`~sandbox.state.Recorder` may serve an injected fault, then adds its injected latency. Every
answered request counts under ``defender.incidents`` / ``graph.incidents`` (with a ``:<tenant>`` suffix when
the token names one).

Times are kept as integer 100-ns ticks since the Unix epoch, the resolution Microsoft's timestamps show
(``2020-09-06T14:46:57.0733333Z``), so filters compare exactly.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import json
import logging
import math
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from sandbox.state import Recorder

__all__ = [
    "DEFENDER_AUDIENCE",
    "GRAPH_AUDIENCE",
    "IncidentWorld",
    "create_defender_app",
    "create_graph_app",
]

log = logging.getLogger(__name__)

DEFENDER_AUDIENCE = "https://api.security.microsoft.com"
GRAPH_AUDIENCE = "https://graph.microsoft.com"
DEFENDER_ROLES = frozenset({"Incident.Read.All", "Incident.ReadWrite.All"})
GRAPH_ROLES = frozenset({"SecurityIncident.Read.All", "SecurityIncident.ReadWrite.All"})
APIS = ("defender", "graph")

DEFENDER_MAX_TOP = 100
GRAPH_MAX_TOP = 50
DEFAULT_LIMITS: dict[str, tuple[tuple[int, float], ...]] = {
    "defender": ((50, 60.0), (1500, 3600.0)),
    "graph": ((150, 60.0),),
}

TICKS_PER_SECOND = 10_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_SEED_START = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


# --------------------------------------------------------------------------------------------------------
# Time: integer ticks (100 ns), rendered like Microsoft's "2020-09-06T14:46:57.0733333Z"


def ticks_from_datetime(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * TICKS_PER_SECOND + delta.microseconds * 10


_TS_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2})?)(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})?$")


def parse_timestamp(text: str) -> int:
    """ISO-8601 (any fraction length, ``Z`` or an offset; no zone means UTC) → ticks. ValueError if not one."""
    match = _TS_RE.match(text.strip())
    if not match:
        raise ValueError(f"not an ISO-8601 timestamp: {text!r}")
    base, fraction, zone = match.groups()
    whole = datetime.fromisoformat(base + ("" if zone in (None, "Z") else zone))
    if whole.tzinfo is None:
        whole = whole.replace(tzinfo=UTC)
    ticks = ticks_from_datetime(whole)
    if fraction:
        ticks += int((fraction + "0000000")[:7])
    return ticks


def format_ticks(ticks: int) -> str:
    seconds, rest = divmod(ticks, TICKS_PER_SECOND)
    stamp = (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{rest:07d}Z"


def _to_ticks(value: Any) -> int:
    if isinstance(value, datetime):
        return ticks_from_datetime(value)
    if isinstance(value, str):
        return parse_timestamp(value)
    if isinstance(value, int):
        return value
    raise ValueError(f"not a timestamp: {value!r}")


def _format_window(seconds: float) -> str:
    total = int(seconds)
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


# --------------------------------------------------------------------------------------------------------
# Enumerations and their Graph spellings

DEFENDER_STATUSES = ("Active", "InProgress", "Resolved", "Redirected")
SEVERITIES = ("Informational", "Low", "Medium", "High")
CLASSIFICATIONS = ("Unknown", "FalsePositive", "TruePositive")
DETERMINATIONS = (
    "NotAvailable",
    "Apt",
    "Malware",
    "SecurityPersonnel",
    "SecurityTesting",
    "UnwantedSoftware",
    "Other",
)
GRAPH_STATUSES = ("active", "resolved", "inProgress", "redirected", "unknownFutureValue", "awaitingAction")

_GRAPH_SERVICE_SOURCE = {
    "MicrosoftDefenderForEndpoint": "microsoftDefenderForEndpoint",
    "MicrosoftCloudAppSecurity": "microsoftDefenderForCloudApps",
    "MicrosoftDefenderForIdentity": "microsoftDefenderForIdentity",
    "MicrosoftDefenderForOffice365": "microsoftDefenderForOffice365",
}
_GRAPH_DETECTION_SOURCE = {
    "WindowsDefenderAtp": "microsoftDefenderForEndpoint",
    "WindowsDefenderAv": "antivirus",
    "WindowsDefenderSmartScreen": "smartScreen",
    "MCAS": "microsoftDefenderForCloudApps",
    "OfficeATP": "microsoftDefenderForOffice365",
    "AzureATP": "microsoftDefenderForIdentity",
    "CustomDetection": "customDetection",
}


def _camel(value: str | None) -> str | None:
    if value is None:
        return None
    return value[:1].lower() + value[1:]


def _graph_determination(value: str | None) -> str | None:
    if value is None:
        return None
    return "unknown" if value == "NotAvailable" else _camel(value)


# --------------------------------------------------------------------------------------------------------
# Deterministic fake data


_ORGS = ("contoso", "fabrikam", "northwind", "adatum", "tailspin", "woodgrove", "litware", "proseware")
_PEOPLE = ("alex.w", "megan.b", "lee.g", "isaiah.l", "diego.s", "patti.f", "nestor.w", "lidia.h", "joni.s")
_HOSTS = ("ws-fin-", "ws-hr-", "srv-sql-", "srv-dc-", "lt-dev-", "ws-ops-")
_IPS = ("62.216.203.204", "185.220.101.45", "45.153.160.2", "10.0.4.17", "172.16.9.201", "91.219.236.166")
_URLS = ("down.esales360.cn", "login-microsoftonline.co", "cdn.invoice-share.net", "update.winsvc.top")
_FILES = (
    ("mimikatz.exe", "C:\\Users\\Public\\Downloads"),
    ("invoice_2291.docm", "C:\\Users\\%s\\AppData\\Local\\Temp"),
    ("svchost.exe", "C:\\ProgramData\\Microsoft\\Crypto"),
    ("Detector.UnitTests.dll", "C:\\Agent\\_work\\_temp\\Deploy"),
    ("payload.ps1", "C:\\Windows\\Temp"),
)
_TEMPLATES: tuple[dict[str, Any], ...] = (
    {
        "title": "Suspicious process injection observed",
        "category": "DefenseEvasion",
        "service": "MicrosoftDefenderForEndpoint",
        "detection": "WindowsDefenderAtp",
        "mitre": ["T1055"],
        "entities": ("Process", "File", "User"),
        "device": True,
        "description": "A process abnormally injected code into another process. As a result, unexpected code may "
        "be running in the target process memory. Injection is often used to hide malicious code "
        "execution within a trusted process.",
    },
    {
        "title": "'Mimikatz' hacktool was detected",
        "category": "Malware",
        "service": "MicrosoftDefenderForEndpoint",
        "detection": "WindowsDefenderAv",
        "mitre": [],
        "threat": "Mimikatz",
        "entities": ("File",),
        "device": True,
        "description": "Readily available tools, such as hacking programs, can be used by unauthorized "
        "individuals to spy on users. When used by attackers, these tools are often installed without "
        "authorization and used to compromise targeted machines.",
    },
    {
        "title": "Ransomware activity",
        "category": "Impact",
        "service": "MicrosoftCloudAppSecurity",
        "detection": "MCAS",
        "mitre": ["T1486"],
        "entities": ("User", "Ip"),
        "device": False,
        "description": "The user manipulated 99 files with multiple extensions ending with an uncommon "
        "extension. This is an unusual number of file manipulations and is indicative of a potential "
        "ransomware attack.",
    },
    {
        "title": "Email reported by user as malware or phish",
        "category": "InitialAccess",
        "service": "MicrosoftDefenderForOffice365",
        "detection": "OfficeATP",
        "mitre": ["T1566"],
        "entities": ("MailBox", "MailMessage", "MailCluster"),
        "device": False,
        "description": "This alert is triggered when any email message is reported as malware or phish by users "
        "-V1.0.0.2",
    },
    {
        "title": "Impossible travel activity",
        "category": "InitialAccess",
        "service": "MicrosoftCloudAppSecurity",
        "detection": "MCAS",
        "mitre": ["T1078"],
        "entities": ("User", "Ip", "Ip"),
        "device": False,
        "description": "The user signed in from two distant locations within a time period shorter than the "
        "expected travel time between them.",
    },
    {
        "title": "Suspicious connection blocked by network protection",
        "category": "CommandAndControl",
        "service": "MicrosoftDefenderForEndpoint",
        "detection": "WindowsDefenderSmartScreen",
        "mitre": ["T1071.001"],
        "entities": ("Url", "Ip", "Process"),
        "device": True,
        "description": "A process made a connection to a known malicious network destination. Network "
        "protection blocked the connection.",
    },
    {
        "title": "Anomalous modification of a registry run key",
        "category": "Persistence",
        "service": "MicrosoftDefenderForEndpoint",
        "detection": "WindowsDefenderAtp",
        "mitre": ["T1547.001"],
        "entities": ("Registry", "Process"),
        "device": True,
        "description": "A process registered a program to run automatically when a user signs in, a common "
        "persistence technique.",
    },
    {
        "title": "Suspected brute-force attack (Kerberos, NTLM)",
        "category": "CredentialAccess",
        "service": "MicrosoftDefenderForIdentity",
        "detection": "AzureATP",
        "mitre": ["T1110"],
        "entities": ("User", "Ip"),
        "device": False,
        "description": "Many authentication failures occurred using Kerberos or NTLM from one source.",
    },
    {
        "title": "Suspicious PowerShell command line",
        "category": "Execution",
        "service": "MicrosoftDefenderForEndpoint",
        "detection": "WindowsDefenderAtp",
        "mitre": ["T1059.001"],
        "entities": ("Process", "File", "User"),
        "device": True,
        "description": "A suspicious PowerShell command line was observed. The command line contains an "
        "encoded payload.",
    },
    {
        "title": "Member added to a sensitive security group",
        "category": "Persistence",
        "service": "MicrosoftDefenderForIdentity",
        "detection": "AzureATP",
        "mitre": ["T1098"],
        "entities": ("User", "SecurityGroup"),
        "device": False,
        "description": "A user was added to a sensitive security group, which may give them privileged access.",
    },
)

_ENTITY_FIELDS = (
    "sha1",
    "sha256",
    "fileName",
    "filePath",
    "processId",
    "processCommandLine",
    "processCreationTime",
    "parentProcessId",
    "parentProcessCreationTime",
    "ipAddress",
    "url",
    "accountName",
    "domainName",
    "userSid",
    "aadUserId",
    "userPrincipalName",
    "mailboxDisplayName",
    "mailboxAddress",
    "clusterBy",
    "sender",
    "recipient",
    "subject",
    "deliveryAction",
    "securityGroupId",
    "securityGroupName",
    "registryHive",
    "registryKey",
    "registryValueType",
    "registryValue",
    "deviceId",
)


def _hex(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def _guid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class _Generator:
    """Makes incidents, alerts, devices and entities from one seeded ``random.Random``."""

    def __init__(self, rng: random.Random, tenant_id: str, domain: str) -> None:
        self.rng = rng
        self.tenant_id = tenant_id
        self.domain = domain

    def person(self) -> str:
        return f"{self.rng.choice(_PEOPLE)}@{self.domain}"

    def entity(self, kind: str, at: int, device_id: str | None) -> dict[str, Any]:
        rng = self.rng
        e: dict[str, Any] = {"entityType": kind}
        e.update(dict.fromkeys(_ENTITY_FIELDS))
        user = rng.choice(_PEOPLE)
        if kind in ("File", "Process"):
            name, folder = rng.choice(_FILES)
            e["sha1"] = _hex(rng, 40)
            e["sha256"] = _hex(rng, 64) if rng.random() < 0.6 else None
            e["fileName"] = name
            e["filePath"] = folder.replace("%s", user)
            e["deviceId"] = device_id
        if kind == "Process":
            e["processId"] = rng.randint(400, 30000)
            e["processCommandLine"] = f'"{e["fileName"]}" {rng.choice(("-enc", "/c", "-w hidden", ""))}'.strip()
            e["processCreationTime"] = format_ticks(at - rng.randint(1, 600) * TICKS_PER_SECOND)
            e["parentProcessId"] = rng.randint(400, 30000)
            e["parentProcessCreationTime"] = format_ticks(at - rng.randint(601, 86_400) * TICKS_PER_SECOND)
        elif kind == "Ip":
            e["ipAddress"] = rng.choice(_IPS)
        elif kind == "Url":
            e["url"] = rng.choice(_URLS)
        elif kind == "User":
            e["accountName"] = user
            e["domainName"] = self.domain.split(".")[0].upper()
            e["userSid"] = (
                f"S-1-5-21-{rng.randint(10**9, 4 * 10**9)}-{rng.randint(10**8, 10**9)}-{rng.randint(1000, 9999)}"
            )
            e["aadUserId"] = _guid(rng)
            e["userPrincipalName"] = f"{user}@{self.domain}"
        elif kind == "MailBox":
            e["userPrincipalName"] = f"{user}@{self.domain}"
            e["mailboxDisplayName"] = user.replace(".", " ").title()
            e["mailboxAddress"] = f"{user}@{self.domain}"
        elif kind == "MailMessage":
            e["userPrincipalName"] = f"{user}@{self.domain}"
            e["sender"] = f"billing@{rng.choice(_URLS)}"
            e["recipient"] = f"{user}@{self.domain}"
            e["subject"] = rng.choice(("[EXTERNAL] Attention", "Invoice overdue", "Your parcel is waiting"))
            e["deliveryAction"] = rng.choice(("Delivered", "Blocked", "Junked"))
        elif kind == "MailCluster":
            e["clusterBy"] = "Subject;P2SenderDomain;ContentType"
        elif kind == "Registry":
            e["registryHive"] = "HKEY_LOCAL_MACHINE"
            e["registryKey"] = "SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Run"
            e["registryValueType"] = "String"
            e["registryValue"] = _hex(rng, 8)
            e["deviceId"] = device_id
        elif kind == "SecurityGroup":
            e["securityGroupId"] = _guid(rng)
            e["securityGroupName"] = rng.choice(("Domain Admins", "Network Configuration Operators"))
        return e

    def device(self, at: int) -> dict[str, Any]:
        rng = self.rng
        return {
            "mdatpDeviceId": _hex(rng, 40),
            "aadDeviceId": _guid(rng) if rng.random() < 0.5 else None,
            "deviceDnsName": f"{rng.choice(_HOSTS)}{rng.randint(1, 400):03d}.{self.domain}",
            "osPlatform": rng.choice(("Windows10", "Windows11", "WindowsServer2019", "WindowsServer2016")),
            "version": rng.choice(("1607", "21H2", "22H2", "Other")),
            "osProcessor": "x64",
            "osBuild": rng.choice((14393, 17763, 19045, 22621)),
            "healthStatus": rng.choice(("Active", "Active", "Inactive")),
            "riskScore": rng.choice(("None", "Low", "Medium", "High")),
            "rbacGroupName": rng.choice(("UnassignedGroup", "WDATP-Ring0", "Servers")),
            "rbacGroupId": rng.randint(1, 90),
            "firstSeen": format_ticks(at - rng.randint(30, 900) * 86_400 * TICKS_PER_SECOND),
        }

    def alert(self, incident_id: int, created: int, updated: int, status: str) -> dict[str, Any]:
        rng = self.rng
        t = rng.choice(_TEMPLATES)
        creation = created - rng.randint(0, 5 * TICKS_PER_SECOND)
        first = creation - rng.randint(60, 3600) * TICKS_PER_SECOND
        last = first + rng.randint(0, 3000) * TICKS_PER_SECOND
        if t["service"] == "MicrosoftDefenderForEndpoint":
            alert_id = f"da{rng.randint(10**17, 10**18 - 1)}_{rng.randint(-(2**31), 2**31 - 1)}"
        else:
            prefix = {"MicrosoftCloudAppSecurity": "ca", "MicrosoftDefenderForOffice365": "fa"}.get(t["service"], "aa")
            alert_id = prefix + _guid(rng)
        devices = [self.device(creation) for _ in range(rng.randint(1, 2))] if t["device"] else []
        device_id = devices[0]["mdatpDeviceId"] if devices else None
        resolved = status == "Resolved"
        alert_status = "Resolved" if resolved else rng.choice(("New", "New", "InProgress"))
        kinds = list(t["entities"]) + [rng.choice(("User", "Ip", "Url")) for _ in range(rng.randint(0, 3))]
        return {
            "alertId": alert_id,
            "incidentId": incident_id,
            "serviceSource": t["service"],
            "creationTime": format_ticks(creation),
            "lastUpdatedTime": format_ticks(max(creation, updated - rng.randint(0, 60) * TICKS_PER_SECOND)),
            "resolvedTime": format_ticks(updated) if resolved else None,
            "firstActivity": format_ticks(first),
            "lastActivity": format_ticks(last),
            "title": t["title"],
            "description": t["description"],
            "category": t["category"],
            "status": alert_status,
            "severity": rng.choice(SEVERITIES),
            "investigationId": rng.randint(1000, 99999) if t["device"] and rng.random() < 0.4 else None,
            "investigationState": rng.choice(("UnsupportedAlertType", "Queued", "Running", "Benign"))
            if t["device"]
            else "UnsupportedAlertType",
            "classification": None,
            "determination": None,
            "detectionSource": t["detection"],
            "assignedTo": None,
            "actorName": None,
            "threatFamilyName": t.get("threat"),
            "mitreTechniques": list(t["mitre"]),
            "devices": devices,
            "entities": [self.entity(kind, creation, device_id) for kind in kinds],
        }


# --------------------------------------------------------------------------------------------------------
# The incident record and its two renderings


@dataclass
class _Incident:
    incident_id: int
    name: str
    created: int
    last_update: int
    assigned_to: str | None
    classification: str
    determination: str
    detection_source: str | None
    status: str
    severity: str
    tags: list[str] = field(default_factory=list)
    system_tags: list[str] = field(default_factory=list)
    comments: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    redirect_incident_id: int | None = None
    description: str | None = None

    def defender(self) -> dict[str, Any]:
        return {
            "incidentId": self.incident_id,
            "redirectIncidentId": self.redirect_incident_id,
            "incidentName": self.name,
            "createdTime": format_ticks(self.created),
            "lastUpdateTime": format_ticks(self.last_update),
            "assignedTo": self.assigned_to,
            "classification": self.classification,
            "determination": self.determination,
            "detectionSource": self.detection_source,
            "status": self.status,
            "severity": self.severity,
            "tags": self.tags,
            "comments": self.comments,
            "alerts": self.alerts,
        }

    def graph(self, tenant_id: str, *, expand_alerts: bool) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "@odata.type": "#microsoft.graph.security.incident",
            "id": str(self.incident_id),
            "tenantId": tenant_id,
            "status": _camel(self.status),
            "incidentWebUrl": f"https://security.microsoft.com/incidents/{self.incident_id}?tid={tenant_id}",
            "redirectIncidentId": None if self.redirect_incident_id is None else str(self.redirect_incident_id),
            "displayName": self.name,
            "createdDateTime": format_ticks(self.created),
            "lastUpdateDateTime": format_ticks(self.last_update),
            "assignedTo": self.assigned_to,
            "classification": _camel(self.classification),
            "determination": _graph_determination(self.determination),
            "severity": _camel(self.severity),
            "customTags": self.tags,
            "systemTags": self.system_tags,
            "description": self.description,
            "lastModifiedBy": self.assigned_to or "Automation",
            "resolvingComment": None,
            "summary": None,
            "comments": [
                {
                    "comment": c.get("comment"),
                    "createdByDisplayName": c.get("createdBy"),
                    "createdDateTime": c.get("createdTime"),
                }
                for c in self.comments
            ],
        }
        if expand_alerts:
            doc["alerts"] = [_graph_alert(a, tenant_id) for a in self.alerts]
        return doc


def _graph_alert(a: dict[str, Any], tenant_id: str) -> dict[str, Any]:
    evidence: list[dict[str, Any]] = []
    common = {
        "createdDateTime": a["creationTime"],
        "verdict": "unknown",
        "remediationStatus": "none",
        "remediationStatusDetails": None,
        "roles": [],
        "tags": [],
    }
    for d in a.get("devices", []):
        evidence.append(
            {
                "@odata.type": "#microsoft.graph.security.deviceEvidence",
                **common,
                "firstSeenDateTime": d.get("firstSeen"),
                "mdeDeviceId": d.get("mdatpDeviceId"),
                "azureAdDeviceId": d.get("aadDeviceId"),
                "deviceDnsName": d.get("deviceDnsName"),
                "osPlatform": d.get("osPlatform"),
                "osBuild": d.get("osBuild"),
                "version": d.get("version"),
                "healthStatus": _camel(d.get("healthStatus")),
                "riskScore": _camel(d.get("riskScore")),
                "rbacGroupId": d.get("rbacGroupId"),
                "rbacGroupName": d.get("rbacGroupName"),
            }
        )
    for e in a.get("entities", []):
        kind = e.get("entityType")
        file_details = {
            "sha1": e.get("sha1"),
            "sha256": e.get("sha256"),
            "fileName": e.get("fileName"),
            "filePath": e.get("filePath"),
        }
        user_account = {
            "accountName": e.get("accountName"),
            "domainName": e.get("domainName"),
            "userSid": e.get("userSid"),
            "azureAdUserId": e.get("aadUserId"),
            "userPrincipalName": e.get("userPrincipalName"),
        }
        specific: dict[str, Any]
        if kind == "File":
            specific = {"@odata.type": "#microsoft.graph.security.fileEvidence", "fileDetails": file_details}
        elif kind == "Process":
            specific = {
                "@odata.type": "#microsoft.graph.security.processEvidence",
                "processId": e.get("processId"),
                "parentProcessId": e.get("parentProcessId"),
                "processCommandLine": e.get("processCommandLine"),
                "processCreationDateTime": e.get("processCreationTime"),
                "parentProcessCreationDateTime": e.get("parentProcessCreationTime"),
                "imageFile": file_details,
            }
        elif kind == "User":
            specific = {"@odata.type": "#microsoft.graph.security.userEvidence", "userAccount": user_account}
        elif kind == "Ip":
            specific = {"@odata.type": "#microsoft.graph.security.ipEvidence", "ipAddress": e.get("ipAddress")}
        elif kind == "Url":
            specific = {"@odata.type": "#microsoft.graph.security.urlEvidence", "url": e.get("url")}
        elif kind == "MailBox":
            specific = {
                "@odata.type": "#microsoft.graph.security.mailboxEvidence",
                "displayName": e.get("mailboxDisplayName"),
                "primaryAddress": e.get("mailboxAddress"),
                "userAccount": user_account,
            }
        elif kind == "MailMessage":
            specific = {
                "@odata.type": "#microsoft.graph.security.analyzedMessageEvidence",
                "senderIp": None,
                "p1Sender": {"emailAddress": e.get("sender")},
                "recipientEmailAddress": e.get("recipient"),
                "subject": e.get("subject"),
                "deliveryAction": _camel(e.get("deliveryAction")),
            }
        elif kind == "MailCluster":
            specific = {
                "@odata.type": "#microsoft.graph.security.mailClusterEvidence",
                "clusterBy": e.get("clusterBy"),
            }
        elif kind == "Registry":
            specific = {
                "@odata.type": "#microsoft.graph.security.registryValueEvidence",
                "registryHive": e.get("registryHive"),
                "registryKey": e.get("registryKey"),
                "registryValueType": e.get("registryValueType"),
                "registryValue": e.get("registryValue"),
                "mdeDeviceId": e.get("deviceId"),
            }
        elif kind == "SecurityGroup":
            specific = {
                "@odata.type": "#microsoft.graph.security.securityGroupEvidence",
                "securityGroupId": e.get("securityGroupId"),
                "displayName": e.get("securityGroupName"),
            }
        else:
            specific = {"@odata.type": "#microsoft.graph.security.alertEvidence"}
        evidence.append({"@odata.type": specific.pop("@odata.type"), **common, **specific})
    return {
        "@odata.type": "#microsoft.graph.security.alert",
        "id": a["alertId"],
        "providerAlertId": a["alertId"],
        "incidentId": str(a["incidentId"]),
        "status": _camel(a.get("status")),
        "severity": _camel(a.get("severity")),
        "classification": _camel(a.get("classification")),
        "determination": _graph_determination(a.get("determination")),
        "serviceSource": _GRAPH_SERVICE_SOURCE.get(a.get("serviceSource") or "", _camel(a.get("serviceSource"))),
        "detectionSource": _GRAPH_DETECTION_SOURCE.get(
            a.get("detectionSource") or "", _camel(a.get("detectionSource"))
        ),
        "tenantId": tenant_id,
        "title": a.get("title"),
        "description": a.get("description"),
        "recommendedActions": None,
        "category": a.get("category"),
        "assignedTo": a.get("assignedTo"),
        "alertWebUrl": f"https://security.microsoft.com/alerts/{a['alertId']}?tid={tenant_id}",
        "incidentWebUrl": f"https://security.microsoft.com/incidents/{a['incidentId']}?tid={tenant_id}",
        "actorDisplayName": a.get("actorName"),
        "threatDisplayName": a.get("threatFamilyName"),
        "threatFamilyName": a.get("threatFamilyName"),
        "mitreTechniques": a.get("mitreTechniques", []),
        "createdDateTime": a.get("creationTime"),
        "lastUpdateDateTime": a.get("lastUpdatedTime"),
        "resolvedDateTime": a.get("resolvedTime"),
        "firstActivityDateTime": a.get("firstActivity"),
        "lastActivityDateTime": a.get("lastActivity"),
        "comments": [],
        "evidence": evidence,
    }


# --------------------------------------------------------------------------------------------------------
# OData: $filter parsing


class ODataError(ValueError):
    """A request the real service would refuse with 400."""


@dataclass(frozen=True)
class _Clause:
    field: str
    op: str
    value: Any  # ticks for times, str or None otherwise


_TOKEN_RE = re.compile(r"\s*(?:(\()|(\))|('(?:[^']|'')*')|([^\s()']+))")
_COMPARISONS = ("eq", "ne", "ge", "gt", "le", "lt")


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if not match or match.end() == pos:
            raise ODataError(f"Syntax error at position {pos} in '{text}'.")
        tokens.append(next(g for g in match.groups() if g is not None))
        pos = match.end()
    return tokens


@dataclass(frozen=True)
class _Schema:
    """What one API lets ``$filter`` touch: field name → (record attribute, kind)."""

    times: dict[str, str]  # field → attribute ("created" / "last_update")
    enums: dict[str, tuple[str, tuple[str, ...], Callable[[str], str | None]]]  # field → (attr, allowed, render)
    strings: dict[str, str]  # field → attribute


_DEFENDER_SCHEMA = _Schema(
    times={"lastUpdateTime": "last_update", "createdTime": "created"},
    enums={"status": ("status", DEFENDER_STATUSES, lambda v: v)},
    strings={"assignedTo": "assigned_to"},
)
_GRAPH_SCHEMA = _Schema(
    times={"lastUpdateDateTime": "last_update", "createdDateTime": "created"},
    enums={
        "status": ("status", GRAPH_STATUSES, lambda v: _camel(v)),
        "severity": ("severity", ("unknown", "informational", "low", "medium", "high"), lambda v: _camel(v)),
        "classification": (
            "classification",
            ("unknown", "falsePositive", "truePositive", "informationalExpectedActivity"),
            lambda v: _camel(v),
        ),
        "determination": (
            "determination",
            ("unknown", "apt", "malware", "securityPersonnel", "securityTesting", "unwantedSoftware", "other"),
            _graph_determination,
        ),
    },
    strings={"assignedTo": "assigned_to"},
)


def parse_filter(text: str, schema: _Schema) -> list[_Clause]:
    """``a ge X and (b eq 'y')`` → clauses, all of which must hold. Anything else → :class:`ODataError`."""
    tokens = _tokenize(text)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ODataError(f"Syntax error: unexpected end of the $filter expression '{text}'.")
        pos += 1
        return tokens[pos - 1]

    def expr() -> list[_Clause]:
        clauses = term()
        while peek() is not None and peek() != ")":
            word = take()
            if word.lower() != "and":
                raise ODataError(
                    f"The query specified in the URI is not valid. Operator '{word}' is not supported in $filter."
                )
            clauses += term()
        return clauses

    def term() -> list[_Clause]:
        if peek() == "(":
            take()
            inner = expr()
            if take() != ")":
                raise ODataError(f"Syntax error: ')' expected in '{text}'.")
            return inner
        return [clause()]

    def clause() -> _Clause:
        name = take()
        if peek() == "(":
            raise ODataError(f"The query specified in the URI is not valid. Function '{name}' is not supported.")
        op = take().lower()
        raw = take()
        if op not in _COMPARISONS:
            raise ODataError(f"The query specified in the URI is not valid. Operator '{op}' is not supported.")
        if name in schema.times:
            if raw.startswith("'"):
                raise ODataError(
                    f"A binary operator with incompatible types was detected. Found operand types "
                    f"'Edm.DateTimeOffset' and 'Edm.String' for operator kind '{op}'."
                )
            try:
                return _Clause(name, op, parse_timestamp(raw))
            except ValueError:
                raise ODataError(f"Syntax error: the DateTimeOffset literal '{raw}' is not valid.") from None
        if name in schema.enums or name in schema.strings:
            if op not in ("eq", "ne"):
                raise ODataError(f"The query specified in the URI is not valid. Operator '{op}' on '{name}'.")
            if raw == "null":
                return _Clause(name, op, None)
            if not (raw.startswith("'") and raw.endswith("'") and len(raw) >= 2):
                raise ODataError(f"Syntax error: a quoted string was expected for '{name}', found '{raw}'.")
            value = raw[1:-1].replace("''", "'")
            if name in schema.enums:
                allowed = schema.enums[name][1]
                canonical = next((a for a in allowed if a.lower() == value.lower()), None)
                if canonical is None:
                    raise ODataError(f"The string '{value}' is not a valid enumeration value for '{name}'.")
                value = canonical
            return _Clause(name, op, value)
        raise ODataError(
            f"The query specified in the URI is not valid. Could not find a property named '{name}' usable in $filter."
        )

    result = expr()
    if pos != len(tokens):
        raise ODataError(f"Syntax error at position {pos} in '{text}'.")
    return result


def _matches(inc: _Incident, clauses: Iterable[_Clause], schema: _Schema) -> bool:
    for c in clauses:
        if c.field in schema.times:
            left: Any = getattr(inc, schema.times[c.field])
        elif c.field in schema.enums:
            attr, _allowed, render = schema.enums[c.field]
            left = render(getattr(inc, attr))
        else:
            left = getattr(inc, schema.strings[c.field])
        right = c.value
        if c.op == "eq":
            ok = left == right
        elif c.op == "ne":
            ok = left != right
        elif left is None or right is None:
            ok = False
        elif c.op == "ge":
            ok = left >= right
        elif c.op == "gt":
            ok = left > right
        elif c.op == "le":
            ok = left <= right
        else:
            ok = left < right
        if not ok:
            return False
    return True


# --------------------------------------------------------------------------------------------------------
# The world


@dataclass
class _Tenant:
    domain: str
    incidents: dict[int, _Incident] = field(default_factory=dict)
    next_id: int = 0
    rng: random.Random = field(default_factory=random.Random)
    tenant_id_override: str | None = None
    override_ids: set[int] | None = None  # None: every incident


@dataclass
class _PageHook:
    api: str | None
    at: int
    callback: Callable[[IncidentWorld], Any]


@dataclass(frozen=True)
class Throttle:
    """Why a call was refused: the limit it hit and how long until a slot frees up."""

    limit: int
    window: float
    retry_after: float


class IncidentWorld:
    """Thread-safe store of per-tenant incidents, rate-limit windows, call logs and page hooks."""

    def __init__(self, *, clock: Callable[[], float] | None = None) -> None:
        self._lock = threading.RLock()
        self._tenants: dict[str, _Tenant] = {}
        #: Seconds since the epoch; replace it to drive rate-limit windows and update times without sleeping.
        self.clock: Callable[[], float] = clock or time.time
        #: Add ``@odata.nextLink`` to Defender pages when more rows remain (undocumented upstream; off).
        self.defender_next_link = False
        #: Whether a refused (429) call still counts against the window, as Microsoft says it does.
        self.throttled_calls_count = True
        self._limits: dict[str, tuple[tuple[int, float], ...]] = dict(DEFAULT_LIMITS)
        self._tenant_limits: dict[tuple[str, str], tuple[tuple[int, float], ...]] = {}
        self._calls: dict[tuple[str, str], list[float]] = {}
        self._counted: dict[tuple[str, str], list[float]] = {}
        self._throttled: dict[tuple[str, str], int] = {}
        self._pages: dict[tuple[str, str | None], int] = {}
        self._hooks: dict[str, list[_PageHook]] = {}

    # ----- data --------------------------------------------------------------------------------------

    def _tenant(self, tenant_id: str) -> _Tenant:
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            rng = random.Random(f"tenant:{tenant_id}")
            domain = f"{rng.choice(_ORGS)}{rng.randint(1, 99)}.onmicrosoft.com"
            tenant = _Tenant(domain=domain, next_id=rng.randint(100_000, 900_000), rng=rng)
            self._tenants[tenant_id] = tenant
        return tenant

    def _now_ticks(self) -> int:
        return int(self.clock() * TICKS_PER_SECOND)

    def tenants(self) -> list[str]:
        with self._lock:
            return sorted(self._tenants)

    def seed_tenant(
        self,
        tenant_id: str,
        count: int,
        *,
        seed: int | str = 0,
        alerts_per_incident: int | None = None,
        start: datetime | str | None = None,
    ) -> list[dict[str, Any]]:
        """Add ``count`` incidents made only from (tenant, seed, arguments): the same call gives the same data.

        Created times advance from ``start`` (default 2024-05-01T08:00Z) by 30 s to 1 h each; about one in ten
        incidents shares its ``lastUpdateTime`` with the one before (ties happen upstream). ``alerts_per_incident``
        None: 1-4 alerts each. Returns the new incidents as Defender documents.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        rng = random.Random(f"seed:{tenant_id}:{seed}:{count}:{alerts_per_incident}")
        at = _to_ticks(start) if start is not None else ticks_from_datetime(DEFAULT_SEED_START)
        with self._lock:
            tenant = self._tenant(tenant_id)
            gen = _Generator(rng, tenant_id, tenant.domain)
            made: list[_Incident] = []
            previous_update: int | None = None
            for _ in range(count):
                at += rng.randint(30 * TICKS_PER_SECOND, 3600 * TICKS_PER_SECOND)
                created = at
                if previous_update is not None and previous_update >= created and rng.random() < 0.1:
                    updated = previous_update
                else:
                    updated = created + rng.choice((0, rng.randint(1, 7200 * TICKS_PER_SECOND)))
                previous_update = updated
                status = rng.choices(("Active", "InProgress", "Resolved"), weights=(70, 10, 20))[0]
                inc = self._build(tenant, gen, created, updated, status, alerts_per_incident)
                made.append(inc)
            return [copy.deepcopy(i.defender()) for i in made]

    def _build(
        self,
        tenant: _Tenant,
        gen: _Generator,
        created: int,
        updated: int,
        status: str,
        alerts: int | None,
        incident_id: int | None = None,
    ) -> _Incident:
        rng = gen.rng
        if incident_id is None:
            incident_id = tenant.next_id
            tenant.next_id += rng.randint(1, 3)
        else:
            tenant.next_id = max(tenant.next_id, incident_id + 1)
        n_alerts = alerts if alerts is not None else rng.randint(1, 4)
        alert_docs = [gen.alert(incident_id, created, updated, status) for _ in range(n_alerts)]
        sources = {a["serviceSource"] for a in alert_docs}
        devices = {d["mdatpDeviceId"] for a in alert_docs for d in a["devices"]}
        if len(alert_docs) == 1:
            name = alert_docs[0]["title"]
            if devices:
                name += " on one endpoint"
        else:
            categories = sorted({a["category"] for a in alert_docs})[:2]
            name = f"Multi-stage incident involving {' & '.join(categories)}"
            if devices:
                name += f" on {len(devices)} endpoints" if len(devices) > 1 else " on one endpoint"
            if len(sources) > 1:
                name += " reported by multiple sources"
        resolved = status == "Resolved"
        inc = _Incident(
            incident_id=incident_id,
            name=name,
            created=created,
            last_update=updated,
            assigned_to=gen.person() if rng.random() < 0.5 else None,
            classification=rng.choice(("FalsePositive", "TruePositive")) if resolved else "Unknown",
            determination=rng.choice(("Malware", "SecurityTesting", "Other")) if resolved else "NotAvailable",
            detection_source=alert_docs[0]["detectionSource"] if alert_docs else None,
            status=status,
            severity=max((a["severity"] for a in alert_docs), key=SEVERITIES.index, default="Informational"),
            tags=["Demo"] if rng.random() < 0.1 else [],
            system_tags=["Ransomware"] if any(a["category"] == "Impact" for a in alert_docs) else [],
            comments=[
                {
                    "comment": "Triaged, escalating to tier 2",
                    "createdBy": gen.person(),
                    "createdTime": format_ticks(updated),
                }
            ]
            if rng.random() < 0.2
            else [],
            alerts=alert_docs,
        )
        tenant.incidents[incident_id] = inc
        return inc

    def add_incident(self, tenant_id: str, **fields: Any) -> dict[str, Any]:
        """Add one incident. ``fields`` use Defender names; ``alerts`` may be a count or a list of alert dicts.

        Unset fields are generated; ``createdTime`` and ``lastUpdateTime`` default to ``world.clock``'s now.
        """
        alerts = fields.pop("alerts", None)
        with self._lock:
            tenant = self._tenant(tenant_id)
            gen = _Generator(tenant.rng, tenant_id, tenant.domain)
            now = self._now_ticks()
            created = _to_ticks(fields.pop("createdTime", now))
            updated = _to_ticks(fields.pop("lastUpdateTime", max(now, created)))
            status = fields.pop("status", "Active")
            incident_id = fields.pop("incidentId", None)
            if incident_id is not None and int(incident_id) in tenant.incidents:
                raise ValueError(f"incident {incident_id} already exists")
            n_alerts = alerts if isinstance(alerts, int) else (0 if alerts is not None else None)
            inc = self._build(
                tenant,
                gen,
                created,
                updated,
                _enum(status, DEFENDER_STATUSES, "status"),
                n_alerts,
                None if incident_id is None else int(incident_id),
            )
            if isinstance(alerts, list):
                inc.alerts = [dict(a, incidentId=inc.incident_id) for a in alerts]
            self._apply(inc, fields)
            return copy.deepcopy(inc.defender())

    def update_incident(self, tenant_id: str, incident_id: int, **changes: Any) -> dict[str, Any]:
        """Change fields (Defender names) and bump ``lastUpdateTime`` (to now, and always forward)."""
        with self._lock:
            inc = self._get(tenant_id, incident_id)
            explicit = changes.pop("lastUpdateTime", None)
            self._apply(inc, changes)
            inc.last_update = _to_ticks(explicit) if explicit is not None else self._bump(inc.last_update)
            return copy.deepcopy(inc.defender())

    def merge(self, tenant_id: str, source_id: int, target_id: int) -> dict[str, Any]:
        """Merge ``source`` into ``target``: the source becomes Redirected with ``redirectIncidentId``; its alerts
        move to the target; both get a new ``lastUpdateTime``. Returns the target."""
        with self._lock:
            source = self._get(tenant_id, source_id)
            target = self._get(tenant_id, target_id)
            if source is target:
                raise ValueError("cannot merge an incident into itself")
            moved = [dict(a, incidentId=target.incident_id) for a in source.alerts]
            target.alerts = target.alerts + moved
            source.alerts = []
            source.status = "Redirected"
            source.redirect_incident_id = target.incident_id
            stamp = self._bump(max(source.last_update, target.last_update))
            source.last_update = stamp
            target.last_update = stamp
            return copy.deepcopy(target.defender())

    def _bump(self, previous: int) -> int:
        return max(self._now_ticks(), previous + 1)

    def _get(self, tenant_id: str, incident_id: int) -> _Incident:
        tenant = self._tenants.get(tenant_id)
        inc = tenant.incidents.get(int(incident_id)) if tenant else None
        if inc is None:
            raise KeyError(f"no incident {incident_id} in tenant {tenant_id}")
        return inc

    def _apply(self, inc: _Incident, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if key == "incidentName":
                inc.name = str(value)
            elif key == "assignedTo":
                inc.assigned_to = value
            elif key == "classification":
                inc.classification = _enum(value, (*CLASSIFICATIONS, "InformationalExpectedActivity"), key)
            elif key == "determination":
                inc.determination = str(value)
            elif key == "detectionSource":
                inc.detection_source = value
            elif key == "status":
                inc.status = _enum(value, DEFENDER_STATUSES, key)
            elif key == "severity":
                inc.severity = _enum(value, SEVERITIES, key)
            elif key == "tags":
                inc.tags = list(value)
            elif key == "systemTags":
                inc.system_tags = list(value)
            elif key == "comments":
                inc.comments = [dict(c) for c in value]
            elif key == "redirectIncidentId":
                inc.redirect_incident_id = None if value is None else int(value)
            elif key == "createdTime":
                inc.created = _to_ticks(value)
            elif key == "description":
                inc.description = value
            else:
                raise ValueError(f"unknown incident field {key!r}")

    def truth(self, tenant_id: str) -> list[dict[str, Any]]:
        """Every incident of the tenant as Defender documents, in the API's default order (most recent first)."""
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            if tenant is None:
                return []
            ordered = _order(list(tenant.incidents.values()), descending=True)
            return copy.deepcopy([i.defender() for i in ordered])

    def set_tenant_id_override(
        self, tenant_id: str, other: str | None, incident_ids: Iterable[int] | None = None
    ) -> None:
        """Make Graph report ``tenantId=other`` for this tenant's incidents (all, or only ``incident_ids``).
        ``other=None`` removes the override."""
        with self._lock:
            tenant = self._tenant(tenant_id)
            tenant.tenant_id_override = other
            tenant.override_ids = None if incident_ids is None else {int(i) for i in incident_ids}

    def reset(self) -> None:
        """Forget every tenant, call log, limit override and hook (switches return to their defaults)."""
        with self._lock:
            self._tenants.clear()
            self._limits = dict(DEFAULT_LIMITS)
            self._tenant_limits.clear()
            self._calls.clear()
            self._counted.clear()
            self._throttled.clear()
            self._pages.clear()
            self._hooks.clear()
            self.defender_next_link = False
            self.throttled_calls_count = True

    # ----- rate limits and call log ----------------------------------------------------------------

    def set_rate_limits(
        self, api: str, limits: Iterable[tuple[int, float]] | None, *, tenant_id: str | None = None
    ) -> None:
        """``limits``: (calls, window seconds) pairs, e.g. ``[(50, 60), (1500, 3600)]``; ``[]`` means no limit.
        With ``tenant_id``, for that tenant only (``None`` limits: back to the world's). Without, the world's
        default for ``api`` (``None``: back to Microsoft's)."""
        _check_api(api)
        with self._lock:
            parsed = None if limits is None else tuple((int(n), float(w)) for n, w in limits)
            if tenant_id is not None:
                if parsed is None:
                    self._tenant_limits.pop((tenant_id, api), None)
                else:
                    self._tenant_limits[(tenant_id, api)] = parsed
            else:
                self._limits[api] = DEFAULT_LIMITS[api] if parsed is None else parsed

    def rate_limits(self, api: str, tenant_id: str | None = None) -> tuple[tuple[int, float], ...]:
        with self._lock:
            if tenant_id is not None and (tenant_id, api) in self._tenant_limits:
                return self._tenant_limits[(tenant_id, api)]
            return self._limits[api]

    def admit(self, tenant_id: str, api: str) -> Throttle | None:
        """Log one call now; None if within every window, else the :class:`Throttle` that refused it."""
        _check_api(api)
        with self._lock:
            now = self.clock()
            key = (tenant_id, api)
            counted = self._counted.setdefault(key, [])
            refused: Throttle | None = None
            for limit, window in self.rate_limits(api, tenant_id):
                first = bisect.bisect_right(counted, now - window)
                if len(counted) - first >= limit:
                    oldest = counted[len(counted) - limit]
                    refused = Throttle(limit, window, max(0.0, oldest + window - now))
                    break
            bisect.insort(self._calls.setdefault(key, []), now)
            if refused is None or self.throttled_calls_count:
                bisect.insort(counted, now)
            if refused is not None:
                self._throttled[key] = self._throttled.get(key, 0) + 1
            return refused

    def call_times(self, tenant_id: str, api: str) -> list[float]:
        """Clock readings of every authenticated call (served or refused) this tenant made to ``api``."""
        with self._lock:
            return list(self._calls.get((tenant_id, api), []))

    def max_calls_in_window(self, tenant_id: str, api: str, seconds: float) -> int:
        """The most calls seen in any sliding window of ``seconds`` (a window ending at t holds (t - s, t])."""
        times = self.call_times(tenant_id, api)
        best = 0
        lo = 0
        for hi, t in enumerate(times):
            while times[lo] <= t - seconds:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def throttled_count(self, tenant_id: str, api: str) -> int:
        """How many 429s this tenant got from ``api``."""
        with self._lock:
            return self._throttled.get((tenant_id, api), 0)

    def reset_calls(self, tenant_id: str | None = None) -> None:
        """Forget call logs, windows and 429 counts (of one tenant, or all)."""
        with self._lock:
            for store in (self._calls, self._counted, self._throttled):
                for key in [k for k in store if tenant_id is None or k[0] == tenant_id]:
                    del store[key]

    def call_stats(self, tenant_id: str, api: str) -> dict[str, Any]:
        with self._lock:
            return {
                "tenant": tenant_id,
                "api": api,
                "calls": len(self._calls.get((tenant_id, api), [])),
                "throttled": self.throttled_count(tenant_id, api),
                "pages": self.pages_served(tenant_id, api),
                "max_per_minute": self.max_calls_in_window(tenant_id, api, 60),
                "max_per_hour": self.max_calls_in_window(tenant_id, api, 3600),
                "call_times": self.call_times(tenant_id, api),
                "limits": [list(x) for x in self.rate_limits(api, tenant_id)],
            }

    # ----- page hooks ------------------------------------------------------------------------------

    def pages_served(self, tenant_id: str, api: str | None = None) -> int:
        """List pages (200 answers to a list request) served to the tenant, by ``api`` or by either."""
        with self._lock:
            return self._pages.get((tenant_id, api), 0)

    def on_page(
        self,
        tenant_id: str,
        page_number: int,
        callback: Callable[[IncidentWorld], Any],
        *,
        api: str | None = None,
    ) -> None:
        """Run ``callback(world)`` right after the ``page_number``-th list page from now (1 = the next page) has
        been rendered for this tenant, before the client can ask for the following one. ``api`` limits the
        count to one API."""
        if page_number < 1:
            raise ValueError("page_number starts at 1")
        if api is not None:
            _check_api(api)
        with self._lock:
            at = self._pages.get((tenant_id, api), 0) + page_number
            self._hooks.setdefault(tenant_id, []).append(_PageHook(api, at, callback))

    def queue_mutation(
        self, tenant_id: str, after_page: int, action: str, *, api: str | None = None, **args: Any
    ) -> None:
        """:meth:`on_page` with a named action: ``update`` (incident_id, changes), ``add`` (fields), ``merge``
        (source_id, target_id). Used by the control routes, where no callback can travel."""
        if action == "update":
            incident_id, changes = int(args["incident_id"]), dict(args.get("changes") or {})

            def run(world: IncidentWorld) -> Any:
                return world.update_incident(tenant_id, incident_id, **changes)

        elif action == "add":
            fields = dict(args.get("fields") or {})

            def run(world: IncidentWorld) -> Any:
                return world.add_incident(tenant_id, **fields)

        elif action == "merge":
            source, target = int(args["source_id"]), int(args["target_id"])

            def run(world: IncidentWorld) -> Any:
                return world.merge(tenant_id, source, target)

        else:
            raise ValueError(f"unknown action {action!r}")
        self.on_page(tenant_id, after_page, run, api=api)

    def _run_page_hooks(self, tenant_id: str, api: str) -> None:
        """Count a served list page and run the hooks now due (outside the lock; a failing hook is logged)."""
        for callback in self._page_served(tenant_id, api):
            try:
                callback(self)
            except Exception:
                log.exception("page hook failed tenant=%s api=%s", tenant_id, api)

    def _page_served(self, tenant_id: str, api: str) -> list[Callable[[IncidentWorld], Any]]:
        with self._lock:
            due: list[Callable[[IncidentWorld], Any]] = []
            for key in ((tenant_id, api), (tenant_id, None)):
                self._pages[key] = self._pages.get(key, 0) + 1
            hooks = self._hooks.get(tenant_id, [])
            keep = []
            for hook in hooks:
                if self._pages[(tenant_id, hook.api)] >= hook.at:
                    due.append(hook.callback)
                else:
                    keep.append(hook)
            self._hooks[tenant_id] = keep
            return due

    # ----- queries (used by the apps) --------------------------------------------------------------

    def _query(
        self,
        tenant_id: str,
        clauses: list[_Clause],
        schema: _Schema,
        order: tuple[str, bool],
        skip: int,
        top: int,
        render: Callable[[_Incident], dict[str, Any]],
    ) -> tuple[list[dict[str, Any]], int]:
        """(rendered page, total rows matching); rendering happens under the lock, on one snapshot."""
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            rows = [i for i in (tenant.incidents.values() if tenant else ()) if _matches(i, clauses, schema)]
            rows = _order(rows, descending=order[1], key=order[0])
            page = rows[skip : skip + top]
            return [render(i) for i in page], len(rows)

    def _one(self, tenant_id: str, incident_id: int, render: Callable[[_Incident], dict[str, Any]]) -> Any:
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            inc = tenant.incidents.get(incident_id) if tenant else None
            return None if inc is None else render(inc)

    def _graph_tenant_id(self, tenant_id: str, incident_id: int) -> str:
        tenant = self._tenants.get(tenant_id)
        if tenant is None or tenant.tenant_id_override is None:
            return tenant_id
        if tenant.override_ids is None or incident_id in tenant.override_ids:
            return tenant.tenant_id_override
        return tenant_id


def _order(rows: list[_Incident], *, descending: bool, key: str = "last_update") -> list[_Incident]:
    return sorted(rows, key=lambda i: (getattr(i, key), i.incident_id), reverse=descending)


def _enum(value: Any, allowed: tuple[str, ...], name: str) -> str:
    for a in allowed:
        if str(value).lower() == a.lower():
            return a
    raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _check_api(api: str) -> None:
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}; got {api!r}")


# --------------------------------------------------------------------------------------------------------
# HTTP


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(data, status, headers=headers, media_type="application/json; charset=utf-8")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _peek_tid(token: str | None) -> str | None:
    """The ``tid`` an unverified token claims; only to label counters on requests answered before auth."""
    if not token:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    tid = claims.get("tid")
    return tid if isinstance(tid, str) else None


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ODataError(f"Invalid value '{raw}' for {name} query option found.") from None
    if value < 0:
        raise ODataError(f"Invalid value '{raw}' for {name} query option found. Value must be non-negative.")
    return value


def _top_exceeded(limit: int, value: int) -> str:
    return f"The limit of '{limit}' for Top query has been exceeded. The value from the incoming request is '{value}'."


class _Api:
    """What differs between the two apps; the request flow is shared."""

    def __init__(
        self,
        name: str,
        world: IncidentWorld,
        recorder: Recorder,
        verify_bearer: Callable[[str, str], dict[str, Any]],
    ) -> None:
        self.name = name
        self.world = world
        self.recorder = recorder
        self.verify_bearer = verify_bearer
        self.counter = f"{name}.incidents"
        self.audience = DEFENDER_AUDIENCE if name == "defender" else GRAPH_AUDIENCE
        self.roles = DEFENDER_ROLES if name == "defender" else GRAPH_ROLES

    # error bodies ------------------------------------------------------------------------------------

    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        request_id = str(uuid.uuid4())
        if self.name == "defender":
            body: dict[str, Any] = {"error": {"code": code, "message": message, "target": request_id}}
        else:
            body = {
                "error": {
                    "code": code,
                    "message": message,
                    "innerError": {
                        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                        "request-id": request_id,
                        "client-request-id": request_id,
                    },
                }
            }
        all_headers = {"request-id": request_id, **(headers or {})}
        return _json(status, body, all_headers)

    def bad_request(self, message: str) -> Response:
        return self.error(400, "BadRequest", message)

    def throttled(self, throttle: Throttle) -> Response:
        if self.name == "defender":
            message = (
                f"API calls quota exceeded! maximum allowed {throttle.limit} per {_format_window(throttle.window)}"
            )
            return self.error(429, "429", message)
        retry = str(max(1, math.ceil(throttle.retry_after)))
        return self.error(429, "TooManyRequests", "Too many requests.", {"Retry-After": retry})

    # flow ----------------------------------------------------------------------------------------------

    async def guard(self, request: Request) -> tuple[Response | None, str]:
        """Fault, latency, auth, quota. Returns (a response to send instead, tenant id)."""
        token = _bearer(request)
        target = request.url.path + ("?" + request.url.query if request.url.query else "")
        fault = self.recorder.take_fault(self.name, target)
        if fault is not None:
            self.recorder.hit(self.counter, _peek_tid(token))
            if fault.delay_seconds > 0:
                await asyncio.sleep(fault.delay_seconds)
            return Response(fault.body, fault.status, headers=fault.headers, media_type=fault.content_type), ""
        await self.recorder.delay(self.name)
        if token is None:
            self.recorder.hit(self.counter)
            return self.unauthorized("Access token is empty." if self.name == "graph" else "Unauthorized"), ""
        try:
            claims = self.verify_bearer(token, self.audience)
        except ValueError:
            self.recorder.hit(self.counter)
            msg = "Access token validation failure." if self.name == "graph" else "Unauthorized"
            return self.unauthorized(msg), ""
        tenant_id = claims.get("tid")
        if not isinstance(tenant_id, str) or not tenant_id:
            self.recorder.hit(self.counter)
            return self.unauthorized("The token has no tenant (tid) claim."), ""
        self.recorder.hit(self.counter, tenant_id)
        roles = claims.get("roles") or []
        if not isinstance(roles, list) or not self.roles.intersection(roles):
            required = ", ".join(sorted(self.roles, reverse=True))
            if self.name == "defender":
                message = (
                    "The application does not have any of the required application permissions "
                    f"({required}) to access the resource."
                )
                return self.error(403, "Forbidden", message), tenant_id
            message = f"Missing application roles. API required roles: {required}. Application roles: {', '.join(map(str, roles))}."
            return self.error(403, "Forbidden", message), tenant_id
        throttle = self.world.admit(tenant_id, self.name)
        if throttle is not None:
            return self.throttled(throttle), tenant_id
        return None, tenant_id

    def unauthorized(self, message: str) -> Response:
        code = "InvalidAuthenticationToken" if self.name == "graph" else "Unauthorized"
        return self.error(401, code, message, {"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'})


def _next_link(request: Request, skip: int, top: int) -> str:
    params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("$skip", "$top")]
    params += [("$top", str(top)), ("$skip", str(skip))]
    return str(request.url.replace(query=urlencode(params, safe="$'(),:")))


def _parse_orderby(raw: str | None, fields: dict[str, str], default: str) -> tuple[str, bool]:
    """``$orderby`` → (record attribute, descending). Default: ``default`` descending (most recent first)."""
    if raw is None:
        return fields[default], True
    parts = raw.split()
    if not parts or len(parts) > 2 or parts[0] not in fields:
        raise ODataError(f"The query specified in the URI is not valid. $orderby '{raw}' is not supported.")
    direction = parts[1].lower() if len(parts) == 2 else "asc"
    if direction not in ("asc", "desc"):
        raise ODataError(f"The query specified in the URI is not valid. $orderby '{raw}' is not supported.")
    return fields[parts[0]], direction == "desc"


def _unsupported_options(request: Request, allowed: set[str]) -> str | None:
    for key in request.query_params:
        if key.startswith("$") and key not in allowed:
            return f"The query parameter '{key}' is not supported."
    return None


def create_defender_app(
    world: IncidentWorld, recorder: Recorder, verify_bearer: Callable[[str, str], dict[str, Any]]
) -> ASGIApp:
    """The Defender XDR incidents API: ``GET /api/incidents`` and ``GET /api/incidents/{id}``."""
    api = _Api("defender", world, recorder, verify_bearer)
    context = f"{DEFENDER_AUDIENCE}/api/$metadata#Incidents"
    order_fields = {"lastUpdateTime": "last_update", "createdTime": "created"}

    async def list_incidents(request: Request) -> Response:
        refused, tenant_id = await api.guard(request)
        if refused is not None:
            return refused
        try:
            problem = _unsupported_options(request, {"$filter", "$top", "$skip", "$orderby"})
            if problem:
                raise ODataError(problem)
            top = _int_param(request, "$top")
            if top is not None and top > DEFENDER_MAX_TOP:
                raise ODataError(_top_exceeded(DEFENDER_MAX_TOP, top))
            page_size = DEFENDER_MAX_TOP if top is None else top
            skip = _int_param(request, "$skip") or 0
            raw_filter = request.query_params.get("$filter")
            clauses = parse_filter(raw_filter, _DEFENDER_SCHEMA) if raw_filter else []
            order = _parse_orderby(request.query_params.get("$orderby"), order_fields, "lastUpdateTime")
        except ODataError as exc:
            return api.bad_request(str(exc))
        page, total = world._query(tenant_id, clauses, _DEFENDER_SCHEMA, order, skip, page_size, lambda i: i.defender())
        body: dict[str, Any] = {"@odata.context": context, "value": page}
        if world.defender_next_link and skip + len(page) < total and page:
            body["@odata.nextLink"] = _next_link(request, skip + len(page), page_size)
        response = _json(200, body)
        world._run_page_hooks(tenant_id, "defender")
        return response

    async def get_incident(request: Request) -> Response:
        refused, tenant_id = await api.guard(request)
        if refused is not None:
            return refused
        raw = request.path_params["incident_id"]
        if not raw.isdigit():
            return api.bad_request(f"The incident id '{raw}' is not valid.")
        doc = world._one(tenant_id, int(raw), lambda i: i.defender())
        if doc is None:
            return api.error(404, "NotFound", f"Incident {raw} was not found")
        return _json(200, {"@odata.context": context + "/$entity", **doc})

    return Starlette(
        routes=[
            Route("/api/incidents", list_incidents, methods=["GET"]),
            Route("/api/incidents/{incident_id}", get_incident, methods=["GET"]),
        ]
    )


def create_graph_app(
    world: IncidentWorld, recorder: Recorder, verify_bearer: Callable[[str, str], dict[str, Any]]
) -> ASGIApp:
    """The Graph security incidents API: ``GET /v1.0/security/incidents`` and ``/v1.0/security/incidents/{id}``."""
    api = _Api("graph", world, recorder, verify_bearer)
    order_fields = {"lastUpdateDateTime": "last_update", "createdDateTime": "created"}

    def expand_of(request: Request) -> bool:
        raw = request.query_params.get("$expand")
        if raw is None:
            return False
        if raw.strip() != "alerts":
            raise ODataError(f"Could not find a property named '{raw}' on type 'microsoft.graph.security.incident'.")
        return True

    def renderer(tenant_id: str, expand: bool) -> Callable[[_Incident], dict[str, Any]]:
        def render(inc: _Incident) -> dict[str, Any]:
            return inc.graph(world._graph_tenant_id(tenant_id, inc.incident_id), expand_alerts=expand)

        return render

    def context_of(expand: bool, entity: bool = False) -> str:
        base = f"{GRAPH_AUDIENCE}/v1.0/$metadata#security/incidents"
        return base + ("(alerts())" if expand else "") + ("/$entity" if entity else "")

    async def list_incidents(request: Request) -> Response:
        refused, tenant_id = await api.guard(request)
        if refused is not None:
            return refused
        try:
            problem = _unsupported_options(request, {"$filter", "$top", "$skip", "$orderby", "$expand", "$count"})
            if problem:
                raise ODataError(problem)
            top = _int_param(request, "$top")
            if top is not None and top > GRAPH_MAX_TOP:
                raise ODataError(_top_exceeded(GRAPH_MAX_TOP, top))
            page_size = GRAPH_MAX_TOP if top is None else top
            skip = _int_param(request, "$skip") or 0
            raw_filter = request.query_params.get("$filter")
            clauses = parse_filter(raw_filter, _GRAPH_SCHEMA) if raw_filter else []
            order = _parse_orderby(request.query_params.get("$orderby"), order_fields, "lastUpdateDateTime")
            expand = expand_of(request)
            count = request.query_params.get("$count", "false").lower()
            if count not in ("true", "false"):
                raise ODataError(f"'{count}' is not a valid count option.")
        except ODataError as exc:
            return api.bad_request(str(exc))
        page, total = world._query(
            tenant_id, clauses, _GRAPH_SCHEMA, order, skip, page_size, renderer(tenant_id, expand)
        )
        body: dict[str, Any] = {"@odata.context": context_of(expand)}
        if count == "true":
            body["@odata.count"] = total
        body["value"] = page
        if skip + len(page) < total and page:
            body["@odata.nextLink"] = _next_link(request, skip + len(page), page_size)
        response = _json(200, body)
        world._run_page_hooks(tenant_id, "graph")
        return response

    async def get_incident(request: Request) -> Response:
        refused, tenant_id = await api.guard(request)
        if refused is not None:
            return refused
        raw = request.path_params["incident_id"]
        try:
            problem = _unsupported_options(request, {"$expand"})
            if problem:
                raise ODataError(problem)
            expand = expand_of(request)
        except ODataError as exc:
            return api.bad_request(str(exc))
        doc = world._one(tenant_id, int(raw), renderer(tenant_id, expand)) if raw.isdigit() else None
        if doc is None:
            return api.error(404, "NotFound", f"Incident with id '{raw}' was not found.")
        return _json(200, {"@odata.context": context_of(expand, entity=True), **doc})

    return Starlette(
        routes=[
            Route("/v1.0/security/incidents", list_incidents, methods=["GET"]),
            Route("/v1.0/security/incidents/{incident_id}", get_incident, methods=["GET"]),
        ]
    )
