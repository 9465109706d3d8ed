"""Stand-ins for the Microsoft Defender XDR incidents API and the Microsoft Graph security incidents API.

``world`` holds the incidents and the rate-limit windows both APIs serve from; ``control`` drives a world
from a test or another process.
"""
