"""Deterministic fake data: incidents' alerts, devices and entities made from one seeded ``random.Random``."""

from __future__ import annotations

import random
import uuid
from typing import Any

from sandbox.security.records import SEVERITIES
from sandbox.security.timestamps import TICKS_PER_SECOND, format_ticks

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


class Generator:
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


def tenant_domain(rng: random.Random) -> str:
    """A plausible ``*.onmicrosoft.com`` domain for a tenant."""
    return f"{rng.choice(_ORGS)}{rng.randint(1, 99)}.onmicrosoft.com"
