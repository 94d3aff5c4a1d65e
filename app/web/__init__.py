"""The service's web pages: the layer report page (`report_page`), its tables and its static resources
(`report.html`, `report.css`, `report.js`, shipped as package data)."""
