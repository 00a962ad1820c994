"""The image proxy: a finished task's image served by mjgate itself.

``signing`` (signed, expiring URLs), ``hosts`` (which hosts and addresses may be fetched
from), ``fetch`` (one safe fetch from an image host), ``diskstore`` and ``s3store`` (where
images are kept), ``links`` (a task's image links and their rewriting) and ``service`` (all of
it behind one object, with single flight and rehosting).
"""
