{# Fails on every row whose value lies outside [min, max] (or is NULL). #}
{% test between(model, column_name, min, max) %}
select {{ column_name }}
from {{ model }}
where {{ column_name }} is null
   or {{ column_name }} < {{ min }}
   or {{ column_name }} > {{ max }}
{% endtest %}
