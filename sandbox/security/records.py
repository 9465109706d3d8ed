"""The incident record, and its two renderings: Defender XDR's (PascalCase enums, integer ids, alerts inline)
and Graph's (camelCase enums, string ids, ``tenantId``, alerts as evidence-bearing ``alert`` resources)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sandbox.security.timestamps import format_ticks

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


def camel(value: str | None) -> str | None:
    if value is None:
        return None
    return value[:1].lower() + value[1:]


def graph_determination(value: str | None) -> str | None:
    if value is None:
        return None
    return "unknown" if value == "NotAvailable" else camel(value)


@dataclass
class Incident:
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
            "status": camel(self.status),
            "incidentWebUrl": f"https://security.microsoft.com/incidents/{self.incident_id}?tid={tenant_id}",
            "redirectIncidentId": None if self.redirect_incident_id is None else str(self.redirect_incident_id),
            "displayName": self.name,
            "createdDateTime": format_ticks(self.created),
            "lastUpdateDateTime": format_ticks(self.last_update),
            "assignedTo": self.assigned_to,
            "classification": camel(self.classification),
            "determination": graph_determination(self.determination),
            "severity": camel(self.severity),
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
                "healthStatus": camel(d.get("healthStatus")),
                "riskScore": camel(d.get("riskScore")),
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
                "deliveryAction": camel(e.get("deliveryAction")),
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
        "status": camel(a.get("status")),
        "severity": camel(a.get("severity")),
        "classification": camel(a.get("classification")),
        "determination": graph_determination(a.get("determination")),
        "serviceSource": _GRAPH_SERVICE_SOURCE.get(a.get("serviceSource") or "", camel(a.get("serviceSource"))),
        "detectionSource": _GRAPH_DETECTION_SOURCE.get(a.get("detectionSource") or "", camel(a.get("detectionSource"))),
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
