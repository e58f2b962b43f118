"""The site side: a site's trained model, its published site card, and (later) answering queries."""

from monai_fedkd.site.card import (
    SITE_CARD_NAME,
    SiteCardError,
    SiteOutputWriter,
    class_counts,
    load_site_model,
    read_site_card,
)

__all__ = ["SITE_CARD_NAME", "SiteCardError", "SiteOutputWriter", "class_counts", "load_site_model", "read_site_card"]
