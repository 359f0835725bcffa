"""The audit page of the review UI (drawn by `app.review.views.audit_page`)."""
from app.review import views

views.audit_page()
