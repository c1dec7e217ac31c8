#!/usr/bin/env python3
"""moto's server for the IAM-enforced suite, with one fix to its request signature check.

Under enforcement moto verifies SigV4 signatures by signing the request again. For S3 it signs
the query string as it received it decoded, so every request whose query carries a `/` (a
ListObjectsV2 `prefix=agentq/jobs/...`) fails with SignatureDoesNotMatch, whatever the client
(boto3 too). AWS signs the URI-encoded query. This wrapper encodes the query before moto signs
it, then runs `moto.server` with the same arguments (`-H 127.0.0.1 -p PORT`).
"""

import sys
import urllib.parse

from moto.iam import access_control
from moto.server import main

_original = access_control.S3IAMRequest._create_aws_request


def _encoded_query(self):
    request = _original(self)
    parts = urllib.parse.urlsplit(request.url)
    if parts.query:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        query = "&".join(
            f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}" for k, v in pairs
        )
        request.url = urllib.parse.urlunsplit(parts._replace(query=query))
    return request


access_control.S3IAMRequest._create_aws_request = _encoded_query

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
