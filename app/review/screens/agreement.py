"""The agreement page of the review UI (drawn by `app.review.views.agreement_page`)."""
from app.review import views

views.agreement_page()
