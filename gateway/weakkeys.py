"""Keys no caller may hold: the most common passwords and the placeholders people paste.

A key on this list is the first one an attacker tries, so the config refuses it, given as a
key or as its digest. The words are the top of the widely published most-common-password
lists plus the stand-ins of API docs and midjourney-proxy setups; each counts in lower case,
Capitalized and UPPER case.
"""

from __future__ import annotations

from gateway.config import hash_key

__all__ = ["is_weak_digest"]

# Whitespace-separated: the words read as a list, not as one per line.
_WORDS = """
123456 123456789 12345678 12345 1234567 1234567890 1234 123 123123 123321 111111 11111111
000000 0000 1111 654321 666666 121212 7777777 888888 112233 987654321 159753 131313 696969
password password1 password12 password123 passw0rd p@ssw0rd p@ssword pass pass123 passwd
qwerty qwerty1 qwerty123 qwertyuiop qwe123 123qwe 1q2w3e 1q2w3e4r 1q2w3e4r5t q1w2e3r4
1qaz2wsx zaq12wsx qazwsx asdf asdfgh asdfghjkl zxcvbnm azerty abc abc123 123abc abcd1234
1234qwer aa123456 iloveyou princess sunshine dragon monkey letmein letmein1 welcome welcome1
football baseball soccer hockey superman batman starwars trustno1 master shadow freedom
whatever hello hello123 hunter hunter2 killer jordan ranger buster harley tigger charlie
michael jennifer jessica ashley michelle nicole daniel thomas robert andrew joshua matthew
pepper cheese cookie summer maggie ginger flower loveme access mustang computer internet
matrix google samsung login admin admin1 admin123 administrator root toor user username
guest test test123 testing default changeme changeme123 change-me changeit secret
secret123 mysecret mypass mypassword foo bar baz foobar xxx xxxx xxxxxx key apikey api-key
api_key mykey yourkey your-key your_key your-api-key your_api_key token mytoken sk-xxx
demo example sample placeholder null none undefined midjourney midjourney-proxy mj-api-secret
"""

_WEAK_DIGESTS = frozenset(
    hash_key(form) for word in _WORDS.split() for form in (word, word.capitalize(), word.upper())
)


def is_weak_digest(digest: str) -> bool:
    """Whether ``digest`` (lower-case hex SHA-256) is that of a well-known weak key."""
    return digest in _WEAK_DIGESTS
