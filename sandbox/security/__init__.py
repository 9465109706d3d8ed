"""Stand-ins for the Microsoft Defender XDR incidents API and the Microsoft Graph security incidents API.

- ``apis``: the two HTTP APIs (auth, quota, OData options, each API's rendering and error bodies);
- ``world``: the incidents both serve from, per tenant, with rate-limit windows, call log and page hooks;
- ``records``: the incident record and its Defender and Graph renderings;
- ``generator``: deterministic fake incidents, alerts, devices and entities;
- ``odata``: ``$filter`` / ``$orderby`` / ``$top`` as the real services accept and refuse them;
- ``timestamps``: 100-ns ticks, the resolution Microsoft's timestamps show;
- ``control``: routes and a client that drive a world from a test or another process.
"""
